"""This node's record of the job: the result its summary prints, and what the workers'
progress records put into the events log (the slowest step, each checkpoint commit once)."""

from __future__ import annotations

import time
from collections import deque

from elastic.launcher.events import EventLog, RunResult
from elastic.exchange.progress import Progress
from elastic.launcher.hang_watch import ProgressWatch
from elastic.rendezvous.protocol import Assignment

PROGRESS_EVERY = 0.5  # seconds between progress events, unless forced at the end of a round


class RunRecord:
    """The job so far, from this agent's point of view."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.result = RunResult(ok=False, reason="not started")
        self._step: int | None = None  # the step of this round's last progress event
        self._step_at = 0.0
        # The newest checkpoint commits logged: a progress record repeats its newest few
        # (Progress.KEPT_COMMITS) at every read, and each is logged once. Bounded: the agent
        # must not grow with the job's length.
        self._logged: deque[int] = deque(maxlen=4 * Progress.KEPT_COMMITS)
        self.newest_commit: int | None = None  # the newest checkpoint commit seen, where a restart resumes
        self._restore_logged = False  # this round's checkpoint_restored event

    def round_sealed(self, assignment: Assignment) -> None:
        self.result.rounds += 1
        self.result.restarts = assignment.restart_count
        self.events.emit("round_sealed", round=assignment.round, world_size=assignment.world_size,
                         group_rank=assignment.group_rank, restarts=assignment.restart_count)
        self._step = None
        self._restore_logged = False

    def progress(self, progress: ProgressWatch, round_: int, *, force: bool = False) -> None:
        """Log what the local ranks' last read progress records show: their slowest completed
        step (at most 2/s, unless `force`d at the end of a round), then new commits."""
        self._log_step(progress, round_, force)
        self._log_restore(progress, round_)
        self._log_commits(progress, round_)

    def _log_restore(self, progress: ProgressWatch, round_: int) -> None:
        """Which checkpoint (step and tier) this round's local ranks resumed from, once."""
        slowest = progress.slowest()
        if self._restore_logged or slowest is None or slowest.restored_tier is None:
            return
        self._restore_logged = True
        self.events.emit("checkpoint_restored", round=round_, step=slowest.resumed, tier=slowest.restored_tier,
                         peer_bytes=progress.restored_peer_bytes())

    def finish(self, *, ok: bool, reason: str, code: int) -> RunResult:
        self.result.ok, self.result.reason, self.result.exit_code = ok, reason, code
        self.events.emit("job_end", ok=ok, reason=reason, exit_code=code)
        self.result.goodput = self.events.goodput()
        return self.result

    def _log_step(self, progress: ProgressWatch, round_: int, force: bool) -> None:
        slowest = progress.slowest()
        now = time.monotonic()
        if slowest is None or slowest.step == self._step:
            return
        if not force and self._step is not None and now - self._step_at < PROGRESS_EVERY:
            return
        self._step, self._step_at = slowest.step, now
        # Stamped with when the step completed (the file's mtime), not when we looked.
        self.events.emit("progress", at=slowest.changed_at, round=round_, step=slowest.step)

    def _log_commits(self, progress: ProgressWatch, round_: int) -> None:
        """The checkpoint commits that every local rank has seen."""
        for commit in progress.committed():
            if commit.step not in self._logged:
                self._logged.append(commit.step)
                if self.newest_commit is None or commit.step > self.newest_commit:
                    self.newest_commit = commit.step
                self.events.emit("checkpoint_committed", at=commit.at, round=round_, step=commit.step,
                                 stall=round(commit.stall, 4), tier=commit.tier)
