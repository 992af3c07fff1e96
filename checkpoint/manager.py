"""CheckpointManager: save, commit, retain and load checkpoints of a training job.

Guarantees:
- multi-process-safe: in a process group every rank calls save()/load() together;
- not thread-safe: call it from the training thread only;
- not multi-job-safe: one job writes to a checkpoint directory at a time (retention removes
  uncommitted leftovers it finds there). Retention prunes only checkpoints whose manifest
  carries this job's run id (TORCHELASTIC_RUN_ID), so resuming from another run's
  checkpoints never deletes them.

Call order:
1. ``CheckpointManager(directory, ...)`` on every rank (it creates a private gloo group for
   the background commit, so checkpoint traffic never interleaves with training
   collectives). Options are keyword-only. ``process_group`` decides the ranks, as in
   DCP: rank and world size are this process's in that group, which saves and loads
   together; a rank outside it must not create this manager.
2. ``save(step, state, metrics)``: snapshots this rank's share of the state into a reusable
   CPU staging buffer and returns; hashing, writing, the cross-rank commit and retention
   run in a background thread. A second ``save()`` first waits for the previous one (at
   most one save in flight). An error from the background is raised by the next call.
3. ``wait()``: block until the pending save is committed (or raise its error).
4. ``load(state, step=None)``: newest committed checkpoint by default; verifies checksums;
   falls back (with a warning) to older ones when the newest is corrupt or incomplete.
5. ``close()`` (or leave a ``with`` block): waits for the pending save.

The manager is a facade over modules named after what they do: `save` (the caller's
half of a save), `commit` (the background write and the cross-rank commit), `prune`
(retention applied to storage), `restore` (load with the fallback the ranks agree on, and
verify), `committed` (what storage shows committed) and `collectives` (the private group).

The overlap trick (opt-in): ``save(..., overlap=True)`` returns before copying; the copy
runs in the background while the caller runs the next forward/backward. Every optimizer
in ``state`` gets a one-shot ``step`` pre-hook that blocks ``optimizer.step()`` until the
copy is done; anything else that changes state in place (BatchNorm running statistics
change in forward, a manual ``tensor.add_``) must call ``wait_snapshot()`` first. Use it
only when nothing in ``state`` changes before ``optimizer.step()``.

``state`` maps names to objects with ``state_dict()/load_state_dict()`` (modules,
optimizers, schedulers), tensors, or JSON values. Optimizer state is keyed by parameter
names. In a process group, plain tensors are taken as replicated (DDP): the ranks split
the writing by bytes; DTensors (FSDP2) are saved as local shards with their offsets.
JSON values are saved from rank 0 and, on load, replace the entries of ``state``.

State that differs between ranks (RNG streams, rank-local buffers or counters) goes in
as ``PerRank(value)``: every rank saves its own value and gets it back on load at the
same world size. At another world size load() raises CheckpointMismatchError naming
the entry, unless it was given as ``PerRank(value, on_resize="keep")``, which keeps the
current value and loads the rest.

The memory tier (``memory_tier=True``, checkpoint.memory_tier): ``save(..., durable=False)``
commits into the node's shared memory only, ``durable=True`` (the default) into memory and
then into ``directory``, from one snapshot. load() takes the newest step that verifies,
from memory first, then from ``directory``; ``restored`` says which. ``steps()``,
``latest()``, ``best()``, ``verify()`` and ``prune()`` are about ``directory``.
``replicas`` (default 1; 0: none) is how many other nodes' memory elastic-run's agents
copy each node's newest memory checkpoint into (ring order), in the background; load()
reads those copies too, so a node lost whole is restored from memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

import torch.distributed as dist

from checkpoint import restore, retention
from checkpoint.collectives import RankGroup
from checkpoint.commit import Committer
from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointError
from checkpoint.format.manifest import Manifest
from checkpoint.io import storage
from checkpoint.memory_tier import MemoryTier
from checkpoint.prune import Pruner
from checkpoint.save import Saver

log = logging.getLogger(__name__)


class CheckpointManager:
    """Sharded, async, atomically committed, verified checkpoints on any fsspec filesystem.

    Collectives: the constructor, ``regroup()``, ``save()`` and ``load()`` are collectives
    of the ranks of ``process_group`` (default: the world): every one of them makes each of
    these calls, in the same order. ``wait()`` and ``close()`` are local (they wait for this
    rank's part of the pending commit, which needs every rank's ``save()``); the rest
    (``steps``, ``latest``, ``best``, ``manifest``, ``damage``, ``verify``, ``preflight``,
    ``prune``) read storage on the calling rank only.

    Call order, what ``state`` may hold, ``save(..., overlap=True)``, the memory tier: see
    the module docstring.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        keep_last: int | None = None,
        async_write: bool = True,
        storage_options: dict[str, Any] | None = None,
        commit_guard: Callable[[], None] | None = None,
        process_group: dist.ProcessGroup | None = None,
        memory_tier: bool = False,
        replicas: int = 1,
    ) -> None:
        self.replicas = _replicas(replicas)
        policy = retention.RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
        self._loc = storage.open_location(_directory(directory), storage_options)
        self._committed = CommittedCheckpoints(self._loc)
        # Recorded in every manifest; the run id also scopes retention (see prune()).
        self._run_id = run_id = os.environ.get("TORCHELASTIC_RUN_ID") or None
        self._pruner = Pruner(self._committed, policy, run_id, verify=self.verify)
        self._committer = Committer(self._committed, self._pruner, run_id, guard=None)
        self._saver = Saver(self._loc, self._committer, async_write)
        self._closed = False
        self._process_group = process_group
        self._ranks: RankGroup | None = None
        self._memory: MemoryTier | None = None
        self.memory_tier = memory_tier  # whether save(durable=False) can be used; placed by regroup() (it depends on the ranks)
        self.restored: restore.Restored | None = None  # what the last load() loaded, and from which tier
        self.set_commit_guard(commit_guard)
        self.regroup()

    def regroup(self) -> None:
        """Take rank, world size and rendezvous round from the current process group and
        environment: at construction, and after the group was re-formed in-process (a
        TrainLoop reconfigured by elastic-run), with no save pending. A collective (see the
        class doc); the previous private group is destroyed first."""
        if self._ranks is not None:
            self._ranks.close()
        self._ranks = RankGroup.current(self._process_group)
        if self.memory_tier:  # a node's leader and its ranks may have changed
            self._memory = MemoryTier.replace(self._memory, self._ranks, self._run_id, self.replicas)

    def set_commit_guard(self, fn: Callable[[], None] | None) -> None:
        """Called on rank 0 right before the manifest is written; if it raises, nothing is committed.

        The manager owns the guard: one with a ``close()`` method (a RoundFence) is closed
        when another replaces it and when the manager closes."""
        _close_guard(self._committer.guard)
        self._committer.guard = fn

    def set_commit_listener(self, fn: Callable[[int, float, str], None] | None) -> None:
        """Called on every rank, from the writer thread, once a save is committed, with its
        step, the seconds that save() held the caller (waiting for the previous save and
        copying; with overlap=True the optimizer step's wait for the copy is not included) and
        its tier: "durable" (`directory`, also when the save went to memory too) or "memory"."""
        self._committer.listener = fn

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
        overlap: bool = False,
        durable: bool = True,
    ) -> None:
        """Snapshot `state` as checkpoint `step`, commit it in the background (a collective; see
        class doc): into the memory tier if on, into `directory` if `durable`."""
        started = time.perf_counter()
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative int")
        if self._memory is None and not durable:
            raise ValueError("save(durable=False) saves into the memory tier only: create the "
                             "CheckpointManager with memory_tier=True")
        self._saver.save(self._ranks, step, state, metrics, epoch=epoch, overlap=overlap, started=started,
                         targets=self._memory.targets(self._committer, durable) if self._memory else None,
                         before_write=self._memory.check_room if self._memory else None)

    def wait_snapshot(self) -> None:
        """Block until an overlapped save's snapshot copy is done (no-op otherwise)."""
        self._saver.wait_snapshot()

    def wait(self) -> None:
        """Block until the pending save is committed; raise its error if it failed."""
        self._saver.wait()

    def close(self) -> None:
        """Wait for the pending save, then release the private group and the commit guard (local)."""
        if not self._closed:
            self._closed = True
            try:
                self.wait()
            finally:
                self.set_commit_guard(None)
                self._ranks.close()
                if self._memory is not None:
                    self._memory.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as pending:
            # The body's exception wins; the pending save's failure is logged, not dropped.
            log.error("checkpoint %s: pending save failed while unwinding: %r", self._loc.url, pending)

    def steps(self) -> list[int]:
        """Committed steps, ascending (an in-flight save appears after wait())."""
        return self._committed.steps()

    def latest(self) -> int | None:
        """The newest committed step that looks loadable, or None.

        Looks loadable: its manifest parses, a listing shows every shard with its recorded
        size, and this manager's load() did not find it corrupt. Checksums are checked by
        load() and verify(), not here.
        """
        return self._committed.latest()

    def damage(self, manifest: Manifest) -> str | None:
        """Why committed `manifest.step` cannot be a resume point, by a cheap check (None: looks whole)."""
        return self._committed.damage(manifest)

    def best(self) -> list[int]:
        """Committed steps ranked best first by the metric (at most keep_best of them)."""
        return self._pruner.best()

    def manifest(self, step: int) -> Manifest:
        """The validated manifest of committed `step`."""
        return self._committed.manifest(step)

    def verify(self, step: int | None = None) -> int:
        """Read every byte of checkpoint `step` (default: latest) and check every checksum.

        Returns the step verified; raises CheckpointNotFoundError or CheckpointCorruptError.
        """
        self._check_open()
        return restore.verify(self._committed, step)

    def preflight(self, state: Mapping[str, Any], step: int | None = None) -> None:
        """Raise CheckpointMismatchError naming every key/shape/dtype that does not fit `state`."""
        self._check_open()
        restore.preflight(self._committed, self._ranks, state, step)

    def load(self, state: MutableMapping[str, Any], step: int | None = None) -> int | None:
        """Load into `state`; returns the step loaded, or None when nothing is committed (a collective).

        Chunks are verified as they are read, some straight into the live tensors; if no
        checkpoint can be loaded the error is raised and `state` may be partly overwritten.
        With the memory tier, a step is read from memory first (see the module docstring).
        """
        self._check_open()
        self.wait()
        sources = [restore.Source(self._committed, "durable")]
        self.restored = restore.load(([self._memory.source] if self._memory else []) + sources, self._ranks, state, step)
        return None if self.restored is None else self.restored.step

    def prune(self, *, dry_run: bool = False, all_runs: bool = False, protect: tuple[int, ...] = (),
              verify_resume_point: bool = True) -> list[int]:
        """Remove uncommitted leftovers and the committed checkpoints the policy lets go.

        Only checkpoints of this run (TORCHELASTIC_RUN_ID) are candidates unless `all_runs`.
        Damaged checkpoints (see `damage()`) are neither counted nor deleted. With
        `verify_resume_point`, the newest undamaged checkpoint is first read whole (a flipped
        byte does not show in a listing); if it fails it counts as damaged and the decision is
        made again. After every commit rank 0 prunes with `protect` = the step just committed
        (hashed as written) and no verification. Returns the steps removed (or that would be,
        with `dry_run`), ascending. Call it from one process only, with no save in flight.
        """
        return self._pruner.prune(dry_run=dry_run, all_runs=all_runs, protect=protect,
                                  verify_resume_point=verify_resume_point)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager({self._loc.url!r}) is closed; create a new one")


def _directory(directory: str | os.PathLike[str]) -> str:
    if directory is None:
        raise TypeError("CheckpointManager(directory=None): pass a local path or an fsspec URL "
                        "(elastic.init().checkpoint_dir is one under elastic-run)")
    return os.fspath(directory)


def _close_guard(guard: Callable[[], None] | None) -> None:
    close = getattr(guard, "close", None)
    if close is not None:
        close()


def _replicas(replicas: int) -> int:
    if not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas={replicas!r} must be an int >= 0 (copies in other nodes' memory)")
    return replicas
