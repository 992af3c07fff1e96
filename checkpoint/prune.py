"""Retention applied to storage: which steps to delete, and deleting them.

The decision is `checkpoint.retention`'s, from the manifests in storage. Damaged checkpoints
are neither counted nor deleted; uncommitted leftovers (a crash mid-save) are deleted.
Retention prunes only checkpoints whose manifest carries this job's run id, so resuming from
another run's checkpoints never deletes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from checkpoint import retention
from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointCorruptError, CheckpointNotFoundError
from checkpoint.io import storage

log = logging.getLogger(__name__)


class Pruner:
    """Applies `policy` to the committed checkpoints of this run (`run_id`).

    `verify(step)` reads a checkpoint whole and raises CheckpointCorruptError if it is not.
    """

    def __init__(
        self,
        committed: CommittedCheckpoints,
        policy: retention.RetentionPolicy,
        run_id: str | None,
        verify: Callable[[int], object],
    ) -> None:
        self._committed = committed
        self._loc = committed.loc
        self._policy = policy
        self._run_id = run_id
        self._verify = verify

    def best(self) -> list[int]:
        """Committed steps ranked best first by the metric (at most keep_best of them)."""
        if not self._policy.metric:
            return []
        ranked = retention.rank_best(self._infos(only_run=False), self._policy.metric, self._policy.mode)
        return ranked[: self._policy.keep_best] if self._policy.keep_best is not None else ranked

    def after_commit(self, committed: int, current_files: set[str]) -> None:
        """After a commit (rank 0): drop old attempts of this step, then prune."""
        drop_old_attempts(self._loc, committed, current_files)
        self.prune(protect=(committed,), dry_run=False, all_runs=False, verify_resume_point=False)

    def prune(
        self, *, protect: tuple[int, ...], dry_run: bool, all_runs: bool, verify_resume_point: bool
    ) -> list[int]:
        """Delete uncommitted leftovers and what the policy lets go; the steps, ascending (see
        CheckpointManager.prune())."""
        committed_steps = set(self._committed.steps())
        doomed = [s for s in storage.step_dirs(self._loc)
                  if s not in committed_steps and s not in protect and not storage.being_promoted(self._loc, s)]
        doomed += [s for s in self._dropped(all_runs, verify_resume_point) if s not in protect]
        for step in sorted(doomed) if not dry_run else ():
            kind = "retention" if step in committed_steps else "uncommitted leftover"
            log.info("checkpoint %s: deleting step %d (%s)", self._loc.url, step, kind)
            storage.delete_step(self._loc, step)
            self._committed.forget(step)
        return sorted(doomed)

    def _dropped(self, all_runs: bool, verify_resume_point: bool) -> list[int]:
        """The committed steps the policy lets go; with `verify_resume_point`, decided again
        until the resume point (the newest undamaged step) reads whole."""
        if self._policy.keeps_everything:
            return []
        while True:
            infos = self._infos(only_run=not all_runs)
            dropped = [i.step for i, keep in zip(infos, retention.decide(infos, self._policy)) if not keep]
            resume = max((i.step for i in infos if not i.damaged), default=None)
            if not (verify_resume_point and dropped and resume is not None):
                return dropped
            try:
                self._verify(resume)
                return dropped
            except CheckpointCorruptError as exc:
                log.warning("checkpoint %s: step %d fails verification (%s); not a resume point", self._loc.url, resume, exc)
                self._committed.mark_corrupt(resume)

    def _infos(self, *, only_run: bool) -> list[retention.CheckpointInfo]:
        infos = []
        for step in self._committed.steps():
            try:
                manifest = self._committed.manifest(step)
            except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
                # Left alone: never delete or rank what we cannot read.
                log.warning("checkpoint %s: skipping step %d in retention: %s", self._loc.url, step, exc)
                continue
            if only_run and manifest.run_id != self._run_id:
                continue
            damage = self._committed.damage(manifest)
            if damage is not None:
                log.warning(
                    "checkpoint %s: step %d is damaged (%s); retention neither counts nor deletes it",
                    self._loc.url, step, damage,
                )
            infos.append(retention.CheckpointInfo(step, manifest.metrics, damaged=damage is not None))
        return infos


def drop_old_attempts(loc: storage.Location, step: int, current_files: set[str]) -> None:
    """Remove the shard files of earlier attempts at committed `step` (a save of it again)."""
    storage.remove_files(
        loc,
        [loc.path(step, name) for name in storage.file_sizes(loc, step)
         if name.endswith(".safetensors") and name not in current_files],
    )
