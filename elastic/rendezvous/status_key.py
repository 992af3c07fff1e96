"""The live status of a run in etcd: one small key per node, and one consistent read of it all.

Each agent keeps `/<prefix>/status/<run_id>/<node>` (a `NodeStatus`) on its lease, written
when it changed and at most once a second (elastic/launcher/status_publisher.py); on a clean
exit it writes it once more without the lease, so that `elastic-run status` still shows the
last step and checkpoint of a finished job. The keys live outside the run's own prefix
(`/<prefix>/<run_id>/`), which every agent mirrors by watch: inside it, each status write
would wake every agent of the job (N writes a second, N watchers each).

`read_run` is what `elastic-run status` reads: the run's keys and the status keys in one
transaction (one revision), decoded into records. It reads etcd only, never a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic.exchange.codec import Record
from elastic.rendezvous.etcd_client import prefix_range_end
from elastic.rendezvous.protocol import (
    JobClosed,
    Member,
    NodeRecord,
    RoundEnd,
    SealedRound,
)


@dataclass(frozen=True)
class NodeStatus(Record):
    """What one agent says about its node (stable JSON: fields are only ever added)."""

    node: str
    state: str  # joining, starting, training, recovering, rejoining, stopping, exited
    updated_at: float  # wall-clock time of this record
    round: int | None = None  # the sealed round its workers run in
    group_rank: int | None = None
    nproc: int = 0
    pids: tuple[int, ...] = ()
    step: int | None = None  # the slowest local rank's last completed step
    steps_per_s: float | None = None  # over the last few seconds
    busy_per_step: float | None = None  # the busiest local rank's CPU + run-queue seconds per step
    checkpoint_step: int | None = None  # newest durable checkpoint commit its ranks saw
    checkpoint_at: float | None = None
    memory_checkpoint_step: int | None = None  # newest commit into the node's memory tier
    memory_checkpoint_at: float | None = None
    restarts: int = 0
    max_restarts: int = 0
    goodput: float | None = None  # useful / wall time of this node so far
    lost: dict = field(default_factory=dict)  # cause -> seconds lost (goodput)
    reason: str = ""  # why it exited (state "exited")


def status_dir(run_prefix: str) -> str:
    """The status keys' directory for the run whose keys live under `run_prefix` (/<prefix>/<run_id>/)."""
    key_prefix, _, run_id = run_prefix.strip("/").rpartition("/")
    return f"/{key_prefix}/status/{run_id}/"


@dataclass(frozen=True)
class RunStatus:
    """Everything `elastic-run status` shows, as read at one etcd revision."""

    run_id: str
    round: int
    sealed_round: int | None
    sealed: SealedRound | None  # the newest sealed round's record
    closed: JobClosed | None
    restarts: int
    alive: frozenset[str]
    members: dict[str, Member]  # registrations for the current round (forming)
    round_end: RoundEnd | None  # why the round before the current one ended
    nodes: dict[str, NodeRecord]  # failure records
    statuses: dict[str, NodeStatus]
    revision: int


def read_run(client, key_prefix: str, run_id: str) -> RunStatus:
    """One transaction reading the run's keys and its status keys (client: etcd_client.connect)."""
    run_prefix = f"/{key_prefix.strip('/')}/{run_id}/"
    status_prefix = status_dir(run_prefix)
    tx = client.transactions
    _ok, (run_kvs, status_kvs) = client.transaction(compare=[], failure=[], success=[
        tx.get(run_prefix, prefix_range_end(run_prefix)), tx.get(status_prefix, prefix_range_end(status_prefix))])
    keys = {meta.key.decode()[len(run_prefix):]: value for value, meta in run_kvs}
    revision = max((meta.mod_revision for _v, meta in (*run_kvs, *status_kvs)), default=0)
    round_ = int(keys.get("round", b"0"))
    sealed_round = int(keys["sealed_round"]) if "sealed_round" in keys else None
    sealed_raw = keys.get(f"rounds/{sealed_round}/sealed") if sealed_round is not None else None
    end_raw = keys.get(f"rounds/{round_ - 1}/end")
    return RunStatus(
        run_id=run_id, round=round_, sealed_round=sealed_round,
        sealed=SealedRound.from_json(sealed_raw) if sealed_raw else None,
        closed=JobClosed.from_json(keys["closed"]) if "closed" in keys else None,
        restarts=int(keys.get("restarts", b"0")),
        alive=frozenset(_children(keys, "alive/")),
        members={n: Member.from_json(v) for n, v in _children(keys, f"rounds/{round_}/members/").items()},
        round_end=RoundEnd.from_json(end_raw) if end_raw else None,
        nodes={n: NodeRecord.from_json(v) for n, v in _children(keys, "nodes/").items()},
        statuses={meta.key.decode()[len(status_prefix):]: NodeStatus.from_json(value) for value, meta in status_kvs},
        revision=revision,
    )


def _children(keys: dict[str, bytes], parent: str) -> dict[str, bytes]:
    return {k[len(parent):]: v for k, v in keys.items() if k.startswith(parent) and "/" not in k[len(parent):]}
