"""The background half of a save: write this rank's shard, then commit across ranks.

Every rank writes its share and makes it durable. One all-gather of small JSON reports
reaches rank 0, which calls the commit guard (round fencing), writes the manifest (the
commit) and broadcasts the outcome; only then, off the path every rank waits on, does rank 0
apply retention. A failure anywhere before the broadcast is reported through the gather, so
no rank is left waiting in a collective.

Node-local locations (the memory tier: each node's shared memory holds its own ranks'
shards) get the manifest on every node: rank 0 writes it into its node's directory before
the broadcast, which carries the manifest text to the other nodes' leaders (their lowest
rank), which write it into theirs and apply retention there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from checkpoint.collectives import RankGroup
from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointError
from checkpoint.format import statedict
from checkpoint.format.manifest import ChunkEntry, FileEntry, Manifest, TensorEntry
from checkpoint.io import shardfile, storage
from checkpoint.io.writer import Snapshot

log = logging.getLogger(__name__)


@dataclass
class SaveJob:
    """Everything the background needs for one save; built on the caller's thread."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
    ranks: RankGroup
    state_json: str  # the skeleton of the state shared by all ranks
    rank_state_json: str  # this rank's skeletons of its PerRank entries
    meta: dict[str, list[Any]]  # key -> [dtype, shape] of the shared tensors
    rank_meta: dict[str, list[Any]]  # the same for this rank's own tensors
    layout: shardfile.Layout
    buffer: torch.Tensor
    file_name: str
    snapshot: Snapshot
    started: float  # time.perf_counter() when save() was called
    held: float | None = None  # seconds save() held its caller (async saves)


class Retention(Protocol):
    def after_commit(self, committed: int, current_files: set[str]) -> None: ...


@dataclass(frozen=True)
class NodeRole:
    """This rank's part in a node-local location: `leader` (the node's lowest rank) writes the
    manifest and applies retention in its node's directory; `nodes` directories in the job."""

    leader: bool
    nodes: int


class Committer:
    """Writes and commits save jobs into `committed.loc`; `retention` runs after each commit
    (on rank 0; with `node`, on every node's leader).

    `guard` is called on rank 0 right before the manifest is written (if it raises, nothing
    is committed); `listener(step, held, tier)` on every rank once a save is committed.
    """

    def __init__(
        self, committed: CommittedCheckpoints, retention: Retention, run_id: str | None, *,
        guard: Callable[[], None] | None, node: NodeRole | None = None, tier: str = "durable",
    ) -> None:
        self._committed = committed
        self._loc = committed.loc
        self._retention = retention
        self._run_id = run_id
        self._node = node
        self._tier = tier
        self.guard = guard
        self.listener: Callable[[int, float, str], None] | None = None

    def write_and_commit(self, job: SaveJob, copy: Callable[[], None] | None = None, *, notify: bool = True) -> None:
        """Stage (if `copy`), write, then commit across ranks. A failure anywhere is reported to
        rank 0 through the gather, so no rank is left waiting in a collective. `notify`: call
        the listener (one save written to two locations notifies once)."""
        local_error, report = self._write(job, copy)
        reports = job.ranks.all_gather(report)
        outcome: str | None = None
        rank0_error: Exception | None = None
        manifest: Manifest | None = None
        if job.ranks.rank == 0:
            try:
                manifest = self._commit(job, reports)
            except Exception as exc:  # surfaced on rank 0 as is, on other ranks as its text
                rank0_error = exc
                outcome = f"{type(exc).__name__}: {exc}"
        # Other nodes' leaders need the manifest itself (node-local locations only).
        text = manifest.to_json() if manifest is not None and self._node is not None and self._node.nodes > 1 else None
        outcome, text = job.ranks.broadcast([outcome, text])
        if local_error is not None:
            raise local_error
        if rank0_error is not None:
            raise rank0_error
        if outcome is not None:
            raise CheckpointError(f"checkpoint step {job.step} was not committed: {outcome}")
        self._committed.forget(job.step)  # a step saved again has a new manifest, on every rank
        if text is not None and job.ranks.rank != 0 and self._node.leader:
            manifest = self._publish(job.step, text)
        if notify and self.listener is not None:
            # held is None for a synchronous save: the caller has been waiting all along.
            held = job.held if job.held is not None else time.perf_counter() - job.started
            self.listener(job.step, held, self._tier)
        if manifest is not None:
            self._retain(manifest)

    def _write(self, job: SaveJob, copy: Callable[[], None] | None) -> tuple[Exception | None, dict[str, Any]]:
        """This rank's shard written and durable, and its report for rank 0 (or the error)."""
        report: dict[str, Any] = {
            "meta": job.meta, "rank_meta": job.rank_meta, "rank_state": json.loads(job.rank_state_json), "error": None,
        }
        try:
            if copy is not None:
                copy()
            if job.layout.items:
                entry, chunks = shardfile.write_shard(
                    self._loc, job.step, job.file_name, job.layout, job.buffer, job.snapshot.wait_for
                )
                report["file"] = asdict(entry)
                report["chunks"] = [[i.key, asdict(chunks[i.name])] for i in job.layout.items]
        except Exception as exc:  # reported to rank 0 so no rank commits, then re-raised by the caller
            report["error"] = f"rank {job.ranks.rank}: {exc!r}"
            return exc, report
        return None, report

    def _commit(self, job: SaveJob, reports: list[dict[str, Any]]) -> Manifest:
        _check_reports(job, reports)
        manifest = _manifest(job, reports, self._run_id, self._tier)
        text = manifest.to_json()
        Manifest.from_json(text, where=f"manifest of step {job.step} being written")  # same rules as readers
        replacing = storage.is_committed(self._loc, job.step)  # seen before the fence: a save again
        if self.guard is not None:
            self.guard()
        storage.commit(self._loc, job.step, text, replace=replacing)
        log.info("checkpoint %s: committed step %d (%d files)", self._loc.url, job.step, len(manifest.files))
        return manifest

    def _publish(self, step: int, text: str) -> Manifest | None:
        """Another node's leader: the manifest rank 0 committed, written into this node's
        directory. A failure here is this node's alone (its copy of the step is missing, so a
        restore falls back): logged, never raised, since the other ranks have moved on."""
        try:
            storage.commit(self._loc, step, text, replace=storage.is_committed(self._loc, step))
        except CheckpointError as exc:
            log.warning("checkpoint %s: step %d is committed, but not on this node: %s", self._loc.url, step, exc)
            return None
        return Manifest.from_json(text, where=f"manifest of step {step}")

    def _retain(self, manifest: Manifest) -> None:
        """Rank 0 (node-local: every node's leader), once every rank has the outcome: retention.
        The step is committed whatever happens here, so a failure is logged and retention runs
        again after the next commit."""
        self._committed.remember(manifest)
        try:
            self._retention.after_commit(manifest.step, {f.path for f in manifest.files})
        except CheckpointError as exc:
            log.warning("checkpoint %s: step %d is committed, but retention failed (%s); it runs again "
                        "after the next commit, or run `elastic-ckpt prune`", self._loc.url, manifest.step, exc)


def _check_reports(job: SaveJob, reports: list[dict[str, Any]]) -> None:
    """Raise unless every rank wrote, and all saved the same tensors and PerRank names."""
    errors = [r["error"] for r in reports if r["error"]]
    if errors:
        raise CheckpointError(
            f"checkpoint step {job.step} was not committed because a rank failed to write: {errors}"
        )
    for rank, r in enumerate(reports):
        if r["meta"] != job.meta:
            differ = sorted(k for k in set(r["meta"]) | set(job.meta) if r["meta"].get(k) != job.meta.get(k))
            raise CheckpointError(
                f"rank {rank} and rank 0 disagree on the tensors to save (first: {differ[:5]}); "
                "every rank must pass the same state names, keys, shapes and dtypes"
            )
        if set(r["rank_state"]) != set(reports[0]["rank_state"]):
            raise CheckpointError(
                f"rank {rank} saves {sorted(r['rank_state'])} per rank, rank 0 saves "
                f"{sorted(reports[0]['rank_state'])}; every rank must pass the same PerRank names"
            )


def _manifest(job: SaveJob, reports: list[dict[str, Any]], run_id: str | None, tier: str) -> Manifest:
    """The manifest of `job` from every rank's report."""
    meta = dict(job.meta)
    for r in reports:
        meta.update(r["rank_meta"])  # keys are rooted per rank: they never collide
    state = json.loads(job.state_json)
    for name in reports[0]["rank_state"]:
        state[name] = {statedict.PER_RANK_TAG: {str(rank): r["rank_state"][name] for rank, r in enumerate(reports)}}
    chunks: dict[str, list[ChunkEntry]] = {k: [] for k in meta}
    files = []
    for r in reports:
        if "file" in r:
            files.append(FileEntry(**r["file"]))
            for key, c in r["chunks"]:
                c = dict(c, offsets=tuple(c["offsets"]), shape=tuple(c["shape"]))
                chunks[key].append(ChunkEntry(**c))
    return Manifest(
        step=job.step,
        world_size=job.ranks.world,
        files=tuple(files),
        tensors={k: TensorEntry(dtype, tuple(shape), tuple(chunks[k])) for k, (dtype, shape) in meta.items()},
        state=state,
        metrics=job.metrics,
        epoch=job.epoch,
        run_id=run_id,
        round=job.ranks.round,
        created=time.time(),
        tier=tier,
    )
