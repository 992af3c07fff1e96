"""The caller's half of a save: snapshot the state into staging, hand the job to the background.

At most one save is in flight: a second save first waits for the previous one. With
overlap, the snapshot copy itself runs in the background and every optimizer in the state
waits for it in a one-shot `step` pre-hook. One snapshot may be committed into several
locations in turn (the memory tier, then durable storage): copied once, written by each.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from checkpoint.collectives import RankGroup
from checkpoint.commit import Committer, SaveJob
from checkpoint.format import plan, statedict
from checkpoint.format.manifest import dtype_name
from checkpoint.io import shardfile, storage
from checkpoint.io.writer import BackgroundJob, Snapshot, StagingBuffer


class Saver:
    """Saves into `loc` through `committer` (or the committers a save names), in a background
    thread when `async_write`."""

    def __init__(self, loc: storage.Location, committer: Committer, async_write: bool) -> None:
        self._committer = committer
        self._async = async_write
        self._staging = StagingBuffer()
        self._job = BackgroundJob(name=f"checkpoint-writer[{loc.url}]")
        self._snapshot_pending: list[Any] = []

    def save(
        self,
        ranks: RankGroup,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None,
        *,
        epoch: int | None,
        overlap: bool,
        started: float,
        targets: Sequence[Committer] | None = None,
        before_write: Callable[[int], None] | None = None,
    ) -> None:
        """Snapshot `state` as checkpoint `step` and commit it (`started`: when save() was called)
        through each of `targets` in order (default: this saver's committer). `before_write(n)`
        is called with this rank's shard size, with no save in flight (it may be a collective)."""
        self.wait()  # the staging buffer is free again
        skeleton, tensors, own = statedict.flatten_state(state, ranks.rank)
        per_rank = {n for n, obj in state.items() if isinstance(obj, statedict.PerRank)}
        # JSON now, so a non-JSON value fails in the caller's frame.
        state_json = json.dumps({n: s for n, s in skeleton.items() if n not in per_rank})
        rank_state_json = json.dumps({n: skeleton[n] for n in per_rank})
        items = plan.plan_writes(tensors, ranks.rank, ranks.world, own)
        lay = shardfile.layout(items)
        if before_write is not None:
            before_write(lay.total)
        buffer = self._staging.get(lay.total)
        meta = {k: [dtype_name(t.dtype), list(t.shape)] for k, t in tensors.items()}
        job = SaveJob(
            step=step,
            epoch=epoch,
            metrics=statedict.json_safe_metrics(metrics),
            ranks=ranks,
            state_json=state_json,
            rank_state_json=rank_state_json,
            meta={k: v for k, v in meta.items() if k not in own},
            rank_meta={k: v for k, v in meta.items() if k in own},
            layout=lay,
            buffer=buffer,
            file_name=f"rank{ranks.rank:05d}-{uuid.uuid4().hex[:12]}.safetensors",
            snapshot=Snapshot(len(lay.items), what=f"snapshot of step {step}"),
            started=started,
        )
        self._start(job, state, overlap, list(targets) if targets else [self._committer])

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

    def _start(self, job: SaveJob, state: Mapping[str, Any], overlap: bool, targets: list[Committer]) -> None:
        """Copy into staging and commit: here (sync), or copy here and the rest in the
        background, or everything in the background (overlap)."""
        copy = functools.partial(job.snapshot.run, functools.partial(_stage_block, job))
        if not self._async:
            _commit_each(targets, job, copy)
        elif overlap:
            self._snapshot_pending = [job.snapshot] + [
                obj.register_step_pre_hook(lambda *_: job.snapshot.wait())
                for obj in map(statedict.unwrap, state.values())
                if isinstance(obj, torch.optim.Optimizer)
            ]
            job.held = time.perf_counter() - job.started
            self._job.submit(lambda: _commit_each(targets, job, copy))
        else:
            # Copy first, then write: started together, the write competes with the copy for
            # memory bandwidth and the training stall grew ~3x in measurements on a busy host.
            try:
                copy()
            finally:  # even after a failed copy: the writer reports it, so no rank hangs
                job.held = time.perf_counter() - job.started
                self._job.submit(lambda: _commit_each(targets, job))


def _commit_each(targets: list[Committer], job: SaveJob, copy: Callable[[], None] | None = None) -> None:
    """Commit `job` through each target in turn; the first copies (if `copy`), the last
    notifies. A failed commit does not stop the next (every rank fails it alike, so the
    collectives stay matched); the first error is raised at the end."""
    error: Exception | None = None
    for index, committer in enumerate(targets):
        try:
            committer.write_and_commit(job, copy if index == 0 else None, notify=index == len(targets) - 1)
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


def _stage_block(job: SaveJob, index: int) -> None:
    with torch.no_grad():
        item = job.layout.items[index]
        shardfile.staged_view(job.buffer, item, job.layout.starts[index]).copy_(item.source)
