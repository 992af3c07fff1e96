"""The rendezvous state in etcd v3: the key layout, and the transactions that write it.

Keys, all under /<prefix>/<run_id>/:
  round                      current round number; moved on by compare-and-swap
  restarts                   job-wide count of failure restarts (moved with the round)
  sealed_round               the newest sealed round (what commits are fenced against)
  closed                     JSON JobClosed {"ok", "reason"}: the job is over; nobody joins again
  alive/<node>               presence of a node's agent, bound to its lease
  waiting/<node>             a node that wants into the running round, bound to its lease
  nodes/<node>               JSON NodeRecord: failures of a node, kept across agent restarts
  rounds/<r>/members/<node>  JSON Member, bound to the node's lease
  rounds/<r>/sealed          JSON SealedRound, created once by a transaction
  rounds/<r>/done/<node>     the node's workers all finished successfully
  rounds/<r>/left/<node>     the node left on purpose (scale-down, not a failure)
  rounds/<r>/end             JSON RoundEnd {"failure", "reason"}: why round r was ended
  rounds/<r>/failed/<node>   JSON FailureClaim: when the node's workers failed in round r (to blame the first)
  secret/<name>              a random value created once per run by the first agent to ask
                             (replica_token: what the agents' replica servers ask for)

and, outside the mirrored prefix, /<prefix>/status/<run_id>/<node>: JSON NodeStatus, the
node's live status (elastic/rendezvous/status_key.py; not watched by the agents).

Every agent keeps a mirror of these keys: one range read, then a watch from the next
revision (elastic/rendezvous/mirror.py, read by elastic/rendezvous/run_view.py). Decisions
read the mirror, so waiting costs no requests; only writes go to etcd.
Sealing round r deletes round r-2, so the mirror stays small however long the job runs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR, prefix_range_end
from elastic.rendezvous.etcd_writer import EtcdWriter
from elastic.rendezvous.protocol import FailureClaim, JobClosed, Member, NodeRecord, RoundEnd, SealedRound
from elastic.rendezvous.status_key import NodeStatus, status_dir


class EtcdBackend(EtcdWriter):
    """One agent's connection to the run's keys. Writes are transactions; reads use the mirror."""

    def __init__(self, client, key_prefix: str, run_id: str, node_id: str,
                 clock: Callable[[], float] = time.time, retry_for: float = 10.0) -> None:
        super().__init__(client, f"/{key_prefix.strip('/')}/{run_id}/", retry_for)
        self.node_id = node_id
        self._clock = clock
        self._lease = None

    # -- lease (kept alive by elastic/rendezvous/lease.py) -------------------------------------

    def open_lease(self, ttl: float) -> None:
        self._lease = self._retry("taking a lease", lambda: self._client.lease(max(2, int(round(ttl)))))
        self.writes += 1

    def refresh_lease(self) -> bool:
        """Keep the lease alive; False when etcd says it has expired (we were cut off too long)."""
        responses = self._lease.refresh()
        return bool(responses) and responses[0].TTL > 0

    def revoke_lease(self) -> None:
        if self._lease is not None:
            try:
                self._lease.revoke()
            except ANY_ETCD_ERROR:
                pass  # etcd unreachable, or the lease already expired: nothing to release

    def _key(self, suffix: str) -> str:
        return self.prefix + suffix

    # -- transactions ----------------------------------------------------------------------------

    def announce(self) -> bool:
        """Create the round key if the run is new, and mark this agent alive (on its lease).

        False when another live agent holds this node id (its `alive` key exists).
        """
        self._txn([self._tx.create(self._key("round")) == 0], [self._tx.put(self._key("round"), "0")])
        alive = self._key(f"alive/{self.node_id}")
        return self._txn([self._tx.create(alive) == 0], [self._tx.put(alive, "1", lease=self._lease)])

    def shared_secret(self, name: str) -> str:
        """The run's secret `name`: random, created by the first agent to ask (create-if-absent)."""
        key = self._key(f"secret/{name}")
        value, _meta = self._retry(f"reading the run's {name}", lambda: self._client.get(key))
        if value is None:  # read first: a lost create race would count as a failed transaction
            self._txn([self._tx.create(key) == 0], [self._tx.put(key, secrets.token_hex(32))])
            value, _meta = self._retry(f"reading the run's {name}", lambda: self._client.get(key))
        return value.decode()

    def start_new_generation_if_over(self) -> bool:
        """A closed job with no live agent is over: clear `closed` so a relaunch can run.

        The round number is kept (it only grows, so workers of the old job stay fenced) and
        the restart budget starts again, as it does for a new torchrun launch.
        """
        raw, meta = self._client.get(self._key("closed"))
        if raw is None or self._client.get_prefix_response(self._key("alive/"), count_only=True).count:
            return False
        return self._txn(
            [self._tx.mod(self._key("closed")) == meta.mod_revision],
            [self._tx.delete(self._key("closed")), self._tx.delete(self._key("restarts"))],
        )

    def register(self, round_: int, member: Member, seal: SealedRound | None = None) -> bool:
        """Join `round_` (only while it is the current round and not yet sealed); with
        `seal`, seal it in the same transaction (this registration completes the round)."""
        put = self._tx.put(self._key(f"rounds/{round_}/members/{member.node_id}"),
                           member.to_json(), lease=self._lease)
        return self._txn(self._unsealed(round_), [put, *(self._seal_ops(seal) if seal else ())])

    def seal(self, record: SealedRound) -> bool:
        """Create the sealed record once."""
        return self._txn(self._unsealed(record.round), self._seal_ops(record))

    def _unsealed(self, round_: int) -> list:
        """Compares: `round_` is the current round and nobody sealed it yet."""
        return [self._tx.value(self._key("round")) == str(round_),
                self._tx.create(self._key(f"rounds/{round_}/sealed")) == 0]

    def _seal_ops(self, record: SealedRound) -> list:
        """Write the sealed record; also drop round r-2 so the key space stays small."""
        r = record.round
        ops = [self._tx.put(self._key(f"rounds/{r}/sealed"), record.to_json()),
               self._tx.put(self._key("sealed_round"), str(r))]
        if r >= 2:
            old = self._key(f"rounds/{r - 2}/")
            ops.append(self._tx.delete(old, range_end=prefix_range_end(old)))
        return ops

    def bump_round(self, round_: int, *, reason: str, failed_node: str | None, restart: bool = True) -> bool:
        """Move the job to round+1 by compare-and-swap, recording why round `round_` ended.

        With `failed_node`, it is a failure: the job's restart count (unless not `restart`:
        no worker had started) and that node's failure record move in the same transaction,
        so only the agent that wins the race counts it.
        """
        end = RoundEnd(failure=failed_node is not None, reason=reason).to_json()
        compare = [self._tx.value(self._key("round")) == str(round_)]
        success = [self._tx.put(self._key("round"), str(round_ + 1)),
                   self._tx.put(self._key(f"rounds/{round_}/end"), end)]
        if failed_node is not None:
            restarts_raw, restarts_meta = self._retry("a read", lambda: self._client.get(self._key("restarts")))
            node_raw, node_meta = self._retry("a read", lambda: self._client.get(self._key(f"nodes/{failed_node}")))
            record = NodeRecord.from_json(node_raw) if node_raw else NodeRecord()
            record = NodeRecord(record.failures + 1, self._clock())
            compare += [
                self._tx.version(self._key("restarts")) == (restarts_meta.version if restarts_meta else 0),
                self._tx.version(self._key(f"nodes/{failed_node}")) == (node_meta.version if node_meta else 0),
            ]
            restarts = (int(restarts_raw) if restarts_raw else 0) + (1 if restart else 0)
            success += [
                self._tx.put(self._key("restarts"), str(restarts)),
                self._tx.put(self._key(f"nodes/{failed_node}"), record.to_json()),
            ]
        return self._txn(compare, success)

    def set_waiting(self, waiting: bool) -> None:
        key = self._key(f"waiting/{self.node_id}")
        self.writes += 1
        if waiting:
            put = self._retry("registering as waiting", lambda: self._client.put(key, "1", lease=self._lease))
            self.catch_up(put.header.revision)
        else:
            deleted = self._retry("leaving the waiting list",
                                  lambda: self._client.delete(key, return_response=True))
            self.catch_up(deleted.header.revision if deleted.deleted else 0)

    def mark(self, round_: int, what: str) -> None:
        """Record that this node is `done` with, or `left`, round `round_`."""
        key = self._key(f"rounds/{round_}/{what}/{self.node_id}")
        put = self._retry(f"marking {what}", lambda: self._client.put(key, "1"))
        self.writes += 1
        self.catch_up(put.header.revision)

    def claim_failure(self, round_: int, claim: FailureClaim) -> None:
        """Say that this node's workers failed in `round_` (when, and which peers it cannot reach)."""
        key = self._key(f"rounds/{round_}/failed/{self.node_id}")
        self._retry("claiming a failure", lambda: self._client.put(key, claim.to_json()))
        self.writes += 1

    def close(self, *, ok: bool, reason: str) -> None:
        """End the job for every agent; the first reason wins."""
        key = self._key("closed")
        self._txn([self._tx.create(key) == 0], [self._tx.put(key, JobClosed(ok=ok, reason=reason).to_json())])

    def put_status(self, status: NodeStatus, *, on_lease: bool = True) -> None:
        """Write this node's status key, one put with no retry: the next one supersedes it.
        Off the lease, it outlives the agent (its last word on a job that ended)."""
        key = status_dir(self.prefix) + self.node_id
        self._client.put(key, status.to_json(), lease=self._lease if on_lease else None)
        self.writes += 1

    def peer_statuses(self) -> dict[str, NodeStatus]:
        """Every node's status key (one range read; the keys are not mirrored)."""
        found = self._client.get_prefix(status_dir(self.prefix))
        return {meta.key.decode().rpartition("/")[2]: NodeStatus.from_json(value) for value, meta in found}

    def shutdown(self) -> None:
        self.stop_watching()
        self.revoke_lease()
        self._client.close()

