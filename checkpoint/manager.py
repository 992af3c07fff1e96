"""CheckpointManager: save, commit, retain and load checkpoints of a training job.

Guarantees (see the class docstring for the call order):
- multi-process-safe: in a process group every rank calls save()/load() together;
- not thread-safe: call it from the training thread only;
- not multi-job-safe: one job writes to a checkpoint directory at a time (retention removes
  uncommitted leftovers it finds there). Retention prunes only checkpoints whose manifest
  carries this job's run id (TORCHELASTIC_RUN_ID), so resuming from another run's
  checkpoints never deletes them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from checkpoint import retention
from checkpoint.format import plan, statedict
from checkpoint.io import loading, shardfile, storage
from checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    StorageError,
)
from checkpoint.format.manifest import (
    MANIFEST_NAME,
    ChunkEntry,
    FileEntry,
    Manifest,
    TensorEntry,
    dtype_name,
    torch_dtype,
)
from checkpoint.io.writer import BackgroundJob, Snapshot, StagingBuffer
from elastic.exchange import env as names
from elastic.exchange.env import int_var

log = logging.getLogger(__name__)

# Rebuilds on every rank the error another rank hit while loading (agreement is by type name).
_ERRORS_BY_NAME: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (CheckpointCorruptError, CheckpointNotFoundError, CheckpointMismatchError, StorageError)
}


class CheckpointManager:
    """Sharded, async, atomically committed, verified checkpoints on any fsspec filesystem.

    Call order (every rank of the default process group makes every call, in the same order):
    1. ``CheckpointManager(directory, ...)`` on every rank (it creates a private gloo group for
       the background commit, so checkpoint traffic never interleaves with training
       collectives).
    2. ``save(step, state, metrics)``: snapshots this rank's share of the state into a reusable
       CPU staging buffer and returns; hashing, writing, the cross-rank commit and retention
       run in a background thread. A second ``save()`` first waits for the previous one (at
       most one save in flight). An error from the background is raised by the next call.
    3. ``wait()``: block until the pending save is committed (or raise its error).
    4. ``load(state, step=None)``: newest committed checkpoint by default; verifies checksums;
       falls back (with a warning) to older ones when the newest is corrupt or incomplete.
    5. ``close()`` (or leave a ``with`` block): waits for the pending save.

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
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        keep_last: int | None = None,
        async_write: bool = True,
        storage_options: dict[str, Any] | None = None,
        *,
        commit_guard: Callable[[], None] | None = None,
    ) -> None:
        self._policy = retention.RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
        self._loc = storage.open_location(os.fspath(directory), storage_options)
        self._async = async_write
        self._guard = commit_guard
        self._listener: Callable[[int, float], None] | None = None
        self._staging = StagingBuffer()
        self._job = BackgroundJob(name=f"checkpoint-writer[{self._loc.url}]")
        self._snapshot_pending: list[Any] = []
        self._closed = False
        # Steps whose load failed on a checksum or a missing/short file: never a resume point.
        self._found_corrupt: set[int] = set()
        # Recorded in every manifest; the run id also scopes retention (see prune()).
        self._run_id = os.environ.get("TORCHELASTIC_RUN_ID") or None
        self.regroup()

    # ------------------------------------------------------------------ public API

    def regroup(self) -> None:
        """Take rank, world size and rendezvous round from the current process group and
        environment: at construction, and after the group was re-formed in-process (a
        TrainLoop reconfigured by elastic-run), with no save pending."""
        self._round = int_var(os.environ, names.ROUND, None)
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
            self._group = dist.new_group(backend="gloo")
        else:
            self._rank, self._world, self._group = 0, 1, None

    def set_commit_guard(self, fn: Callable[[], None] | None) -> None:
        """Called on rank 0 right before the manifest is written; if it raises, nothing is committed."""
        self._guard = fn

    def set_commit_listener(self, fn: Callable[[int, float], None] | None) -> None:
        """Called on every rank, from the writer thread, once a save is committed, with its
        step and the seconds that save() held the caller (waiting for the previous save and
        copying; with overlap=True the optimizer step's wait for the copy is not included)."""
        self._listener = fn

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
        overlap: bool = False,
    ) -> None:
        """Snapshot `state` as checkpoint `step` and commit it in the background (see class doc)."""
        started = time.perf_counter()
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative int")
        self.wait()
        skeleton, tensors, own = statedict.flatten_state(state, self._rank)
        per_rank = {n for n, obj in state.items() if isinstance(obj, statedict.PerRank)}
        # JSON now, so a non-JSON value fails in the caller's frame.
        state_json = json.dumps({n: s for n, s in skeleton.items() if n not in per_rank})
        rank_state_json = json.dumps({n: skeleton[n] for n in per_rank})
        items = plan.plan_writes(tensors, self._rank, self._world, own)
        lay = shardfile.layout(items)
        buffer = self._staging.get(lay.total)
        meta = {k: [dtype_name(t.dtype), list(t.shape)] for k, t in tensors.items()}
        job = _SaveJob(
            step=step,
            epoch=epoch,
            metrics=statedict.json_safe_metrics(metrics),
            state_json=state_json,
            rank_state_json=rank_state_json,
            meta={k: v for k, v in meta.items() if k not in own},
            rank_meta={k: v for k, v in meta.items() if k in own},
            layout=lay,
            buffer=buffer,
            file_name=f"rank{self._rank:05d}-{uuid.uuid4().hex[:12]}.safetensors",
            snapshot=Snapshot(len(lay.items), what=f"snapshot of step {step}"),
            started=started,
        )
        copy = functools.partial(job.snapshot.run, functools.partial(_stage_block, job))
        if not self._async:
            self._write_and_commit(job, copy)
        elif overlap:
            self._snapshot_pending = [job.snapshot] + [
                obj.register_step_pre_hook(lambda *_: job.snapshot.wait())
                for obj in map(statedict.unwrap, state.values())
                if isinstance(obj, torch.optim.Optimizer)
            ]
            job.held = time.perf_counter() - started
            self._job.submit(lambda: self._write_and_commit(job, copy))
        else:
            # Copy first, then write: started together, the write competes with the copy for
            # memory bandwidth and the training stall grew ~3x in measurements on a busy host.
            try:
                copy()
            finally:  # even after a failed copy: the writer reports it, so no rank hangs
                job.held = time.perf_counter() - started
                self._job.submit(lambda: self._write_and_commit(job))

    def wait_snapshot(self) -> None:
        """Block until an overlapped save's snapshot copy is done (no-op otherwise)."""
        if self._snapshot_pending:
            snapshot, *hooks = self._snapshot_pending
            snapshot.wait()
            for hook in hooks:
                hook.remove()
            self._snapshot_pending = []

    def wait(self) -> None:
        """Block until the pending save is committed; raise its error if it failed."""
        self.wait_snapshot()
        self._job.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.wait()

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
        return storage.committed_steps(self._loc)

    def latest(self) -> int | None:
        """The newest committed step that looks loadable, or None.

        Looks loadable: its manifest parses, a listing shows every shard with its recorded
        size, and this manager's load() did not find it corrupt. Checksums are checked by
        load() and verify(), not here.
        """
        for step in reversed(self.steps()):
            try:
                manifest = self.manifest(step)
            except (CheckpointCorruptError, CheckpointNotFoundError):
                continue
            if self.damage(manifest) is None:
                return step
        return None

    def damage(self, manifest: Manifest) -> str | None:
        """Why committed `manifest.step` cannot be a resume point, by a cheap check (None: looks whole)."""
        if manifest.step in self._found_corrupt:
            return "found corrupt while loading"
        problems = manifest.listing_problems(storage.file_sizes(self._loc, manifest.step))
        return "; ".join(problems) if problems else None

    def best(self) -> list[int]:
        """Committed steps ranked best first by the metric (at most keep_best of them)."""
        if not self._policy.metric:
            return []
        ranked = retention.rank_best(self._infos(), self._policy.metric, self._policy.mode)
        return ranked[: self._policy.keep_best] if self._policy.keep_best is not None else ranked

    def manifest(self, step: int) -> Manifest:
        """The validated manifest of committed `step`."""
        path = self._loc.path(step, MANIFEST_NAME)
        try:
            text = storage.read_bytes(self._loc, path)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step}: {path} does not exist. "
                f"Committed steps: {self.steps()}"
            ) from exc
        manifest = Manifest.from_json(text, where=path)
        if manifest.step != step:
            raise CheckpointCorruptError(f"{path}: records step {manifest.step}, expected {step}")
        return manifest

    def verify(self, step: int | None = None) -> int:
        """Read every byte of checkpoint `step` (default: latest) and check every checksum.

        Returns the step verified; raises CheckpointNotFoundError or CheckpointCorruptError.
        """
        self._check_open()
        if step is None:
            committed = self.steps()  # the newest, damaged or not: that is what is being asked
            if not committed:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self._loc.url}")
            step = committed[-1]
        manifest = self.manifest(step)
        per_file: dict[str, list[tuple[ChunkEntry, torch.dtype]]] = {f.path: [] for f in manifest.files}
        for entry in manifest.tensors.values():
            for chunk in entry.chunks:
                per_file[chunk.file].append((chunk, torch_dtype(entry.dtype)))
        for f in manifest.files:
            shardfile.verify_file(self._loc, step, f, per_file[f.path])
        return step

    def preflight(self, state: Mapping[str, Any], step: int | None = None) -> None:
        """Raise CheckpointMismatchError naming every key/shape/dtype that does not fit `state`."""
        self._check_open()
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self._loc.url}")
        _, targets, _ = statedict.flatten_state(state, self._rank)
        manifest, entries = loading.rank_view(self.manifest(step), state, self._rank, self._world)
        loading.check_fit(manifest, entries, targets)

    def load(self, state: MutableMapping[str, Any], step: int | None = None) -> int | None:
        """Load into `state`; returns the step loaded, or None when nothing is committed.

        Chunks are verified as they are read, some straight into the live tensors; if no
        checkpoint can be loaded the error is raised and `state` may be partly overwritten.
        """
        self._check_open()
        self.wait()
        candidates = self._broadcast(sorted(self.steps(), reverse=True) if self._rank == 0 else None)
        if step is not None:
            if step not in candidates:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint for step {step} in {self._loc.url}; committed: {sorted(candidates)}"
                )
            candidates = [step]
        if not candidates:
            return None
        _, targets, _ = statedict.flatten_state(state, self._rank)
        failures = []
        for cand in candidates:
            loaded, error = None, None
            try:
                manifest, entries = loading.rank_view(self.manifest(cand), state, self._rank, self._world)
                loading.check_fit(manifest, entries, targets)
                loaded = loading.read_state(self._loc, manifest, entries, targets)
            except (CheckpointError, OSError) as exc:  # every rank must reach the agreement below
                error = exc
            errors = self._all_gather(None if error is None else [type(error).__name__, str(error)])
            bad = [(r, e) for r, e in enumerate(errors) if e is not None]
            if not bad:
                statedict.apply(state, loaded)
                log.info("checkpoint %s: rank %d loaded step %d", self._loc.url, self._rank, cand)
                return cand
            rank, (kind, message) = bad[0]
            reason = f"rank {rank}: {message}"
            if error is None:
                error = _ERRORS_BY_NAME.get(kind, CheckpointError)(reason)
            # Only a damaged or vanished checkpoint is a reason to try an older one; a model
            # that does not fit or a storage outage would fail on the older one too.
            damaged = all(e[0] in ("CheckpointCorruptError", "CheckpointNotFoundError") for _, e in bad)
            if damaged:
                self._found_corrupt.add(cand)
            if step is not None or not damaged:
                raise error
            failures.append(f"step {cand}: {reason}")
            warnings.warn(
                f"checkpoint step {cand} in {self._loc.url} cannot be loaded ({reason}); "
                "falling back to the previous committed checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )
        raise CheckpointCorruptError(
            f"no committed checkpoint in {self._loc.url} could be loaded: " + "; ".join(failures)
        )

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager({self._loc.url!r}) is closed; create a new one")

    def _all_gather(self, obj: Any) -> list[Any]:
        """Gather small JSON metadata from every rank (never anything read from a file)."""
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self._world
        dist.all_gather_object(out, json.dumps(obj), group=self._group)
        return [json.loads(s) for s in out]

    def _broadcast(self, obj: Any) -> Any:
        if self._group is None:
            return obj
        box = [json.dumps(obj)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._group, 0), group=self._group)
        return json.loads(box[0])

    def _infos(self, run_id: str | None = None, *, only_run: bool = False) -> list[retention.CheckpointInfo]:
        infos = []
        for step in self.steps():
            try:
                manifest = self.manifest(step)
            except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
                # Left alone: never delete or rank what we cannot read.
                log.warning("checkpoint %s: skipping step %d in retention: %s", self._loc.url, step, exc)
                continue
            if only_run and manifest.run_id != run_id:
                continue
            damage = self.damage(manifest)
            if damage is not None:
                log.warning(
                    "checkpoint %s: step %d is damaged (%s); retention neither counts nor deletes it",
                    self._loc.url, step, damage,
                )
            infos.append(retention.CheckpointInfo(step, manifest.metrics, damaged=damage is not None))
        return infos

    def _write_and_commit(self, job: _SaveJob, copy: Callable[[], None] | None = None) -> None:
        """Stage (if `copy`), write, then commit across ranks. A failure anywhere is reported to
        rank 0 through the gather, so no rank is left waiting in a collective."""
        local_error: Exception | None = None
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
        except Exception as exc:  # reported to rank 0 so no rank commits, then re-raised below
            local_error = exc
            report["error"] = f"rank {self._rank}: {exc!r}"
        reports = self._all_gather(report)
        outcome: str | None = None
        rank0_error: Exception | None = None
        if self._rank == 0:
            try:
                self._commit(job, reports)
            except Exception as exc:  # surfaced on rank 0 as is, on other ranks as its text
                rank0_error = exc
                outcome = f"{type(exc).__name__}: {exc}"
        outcome = self._broadcast(outcome)
        if local_error is not None:
            raise local_error
        if rank0_error is not None:
            raise rank0_error
        if outcome is not None:
            raise CheckpointError(f"checkpoint step {job.step} was not committed: {outcome}")
        if self._listener is not None:
            # held is None for a synchronous save: the caller has been waiting all along.
            self._listener(job.step, job.held if job.held is not None else time.perf_counter() - job.started)

    def _commit(self, job: _SaveJob, reports: list[dict[str, Any]]) -> None:
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
        manifest = Manifest(
            step=job.step,
            world_size=self._world,
            files=tuple(files),
            tensors={k: TensorEntry(dtype, tuple(shape), tuple(chunks[k])) for k, (dtype, shape) in meta.items()},
            state=state,
            metrics=job.metrics,
            epoch=job.epoch,
            run_id=self._run_id,
            round=self._round,
            created=time.time(),
        )
        text = manifest.to_json()
        Manifest.from_json(text, where=f"manifest of step {job.step} being written")  # same rules as readers
        if self._guard is not None:
            self._guard()
        storage.commit(self._loc, job.step, text)
        log.info("checkpoint %s: committed step %d (%d files)", self._loc.url, job.step, len(files))
        self._retain(job.step, {f.path for f in files})

    def _retain(self, committed: int, current_files: set[str]) -> None:
        """After a commit (rank 0): drop old attempts of this step, then prune."""
        storage.remove_files(
            self._loc,
            [
                self._loc.path(committed, name)
                for name in storage.file_sizes(self._loc, committed)
                if name.endswith(".safetensors") and name not in current_files
            ],
        )
        self.prune(protect=(committed,), verify_resume_point=False)

    def prune(
        self,
        *,
        dry_run: bool = False,
        all_runs: bool = False,
        protect: tuple[int, ...] = (),
        verify_resume_point: bool = True,
    ) -> list[int]:
        """Remove uncommitted leftovers and the committed checkpoints the policy lets go.

        Only checkpoints of this run (TORCHELASTIC_RUN_ID) are candidates unless `all_runs`.
        Damaged checkpoints (see `damage()`) are neither counted nor deleted. With
        `verify_resume_point`, before anything is deleted the newest undamaged checkpoint is
        read whole and its checksums checked (a flipped byte does not show in a listing); if
        it fails it counts as damaged and the decision is made again. After every commit the
        manager prunes with `protect` = the step just committed and no verification: that
        step was hashed as it was written, so a good resume point is kept either way. Returns the steps
        removed (or that would be, with `dry_run`), ascending. Call it from one process only,
        with no save in flight.
        """
        committed_steps = set(self.steps())
        doomed = [s for s in storage.step_dirs(self._loc) if s not in committed_steps and s not in protect]
        while True:
            infos = self._infos(self._run_id, only_run=not all_runs)
            dropped = [i.step for i, keep in zip(infos, retention.decide(infos, self._policy)) if not keep]
            resume = max((i.step for i in infos if not i.damaged), default=None)
            if not (verify_resume_point and dropped and resume is not None):
                break
            try:
                self.verify(resume)
                break
            except CheckpointCorruptError as exc:
                log.warning("checkpoint %s: step %d fails verification (%s); not a resume point", self._loc.url, resume, exc)
                self._found_corrupt.add(resume)
        doomed += [s for s in dropped if s not in protect]
        for step in sorted(doomed) if not dry_run else ():
            kind = "retention" if step in committed_steps else "uncommitted leftover"
            log.info("checkpoint %s: deleting step %d (%s)", self._loc.url, step, kind)
            storage.delete_step(self._loc, step)
        return sorted(doomed)


@dataclass
class _SaveJob:
    """Everything the background needs for one save; built on the caller's thread."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
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


def _stage_block(job: _SaveJob, index: int) -> None:
    with torch.no_grad():
        item = job.layout.items[index]
        shardfile.staged_view(job.buffer, item, job.layout.starts[index]).copy_(item.source)
