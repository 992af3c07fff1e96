"""Hang detection from outside the worker: watch the step counter each rank's loop reports.

The agent judges a rank hung when its step (elastic/exchange/progress.py) has not changed
for `hang_timeout` seconds, or when no first step arrived within `first_step_timeout` of the
file's appearance. Only a new step counts (a commit written by another thread does not), and
the times are the agent's own: CLOCK_MONOTONIC when it first saw each step, never the wall
clock a worker wrote, so an NTP step in either process can neither fake nor hide a hang (the
record's wall-clock times only go to the events log, for people). With a calibration factor
(`--hang-timeout auto`), the limit is that factor times the slowest step the rank made in
this round, within [floor, hang_timeout], once it has made enough steps to judge. A worker
that never creates the file (a plain torchrun script) is never judged hung. Reading the file
costs one small read per rank per check; a hang that holds the GIL cannot fake progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from elastic.exchange.progress import Commit, Progress, read_progress


@dataclass(frozen=True)
class Hang:
    rank: int
    reason: str


@dataclass(frozen=True)
class HangLimits:
    """How long a rank that reports steps may stay quiet."""

    timeout: float = 300.0  # without a step (0 disables); the ceiling when calibrated
    first_step_timeout: float = 600.0  # without a first step (imports, data loading, resume)
    factor: float = 0.0  # > 0: calibrated, factor x the slowest step seen in this round ...
    floor: float = 30.0  # ... but at least this long (a checkpoint's first save is slow)

    # Steps a rank must have made in the round before its own step times are trusted: the
    # first ones include warm-up (allocator, first collective, staging buffers).
    CALIBRATION_STEPS = 3

    def limit(self, slowest: float | None, steps_seen: int) -> float:
        if self.factor <= 0 or slowest is None or steps_seen < self.CALIBRATION_STEPS:
            return self.timeout
        return min(self.timeout, max(self.floor, self.factor * slowest))


class ProgressWatch:
    """Judges the ranks of one worker group hung or not."""

    def __init__(self, paths: dict[int, str], limits: HangLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._paths = paths  # rank -> progress file
        self._limits = limits
        self._clock = clock
        self._latest: dict[int, Progress] = {}  # rank -> progress, from the last read()
        self._seen_at: dict[int, float] = {}  # rank -> clock() when its current step was first read
        self._slowest: dict[int, float] = {}  # rank -> longest seconds per step seen this round
        self._steps_seen: dict[int, int] = {}  # rank -> steps timed this round
        for path in paths.values():  # left from an earlier round: not this group's progress
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def read(self) -> None:
        """Read every rank's progress file once; the other methods use what it read."""
        now = self._clock()
        for rank, path in self._paths.items():
            try:
                found = read_progress(path)
            except ValueError:
                continue  # caught mid-rewrite: keep what the last read saw
            if found is None:
                continue
            before = self._latest.get(rank)
            if before is None or found.step != before.step:
                self._time_steps(rank, before, found, now)
                self._seen_at[rank] = now
            self._latest[rank] = found

    def _time_steps(self, rank: int, before: Progress | None, found: Progress, now: float) -> None:
        """Per-step time between two reads that both saw a completed step (averaged when
        several steps went by between them)."""
        if before is None or before.step is None or found.step is None or found.step <= before.step:
            return
        per_step = (now - self._seen_at[rank]) / (found.step - before.step)
        self._slowest[rank] = max(self._slowest.get(rank, 0.0), per_step)
        self._steps_seen[rank] = self._steps_seen.get(rank, 0) + found.step - before.step

    def steps(self) -> dict[int, int | None]:
        """rank -> last completed step, for ranks that report progress (as of read())."""
        return {rank: p.step for rank, p in self._latest.items()}

    def slowest(self) -> Progress | None:
        """The least advanced rank's progress (with when it was written), among ranks that
        have completed a step (as of read())."""
        found = [p for p in self._latest.values() if p.step is not None]
        return min(found, key=lambda p: (p.step, p.changed_at)) if found else None

    def restored_peer_bytes(self) -> int:
        """The bytes the local ranks' resume read from other nodes' memory (as of read())."""
        return sum(p.restored_peer_bytes for p in self._latest.values())

    def reporting(self) -> bool:
        """Whether any rank reports progress (as of read()): a TrainLoop or elastic.init() does."""
        return bool(self._latest)

    def first_step_done(self) -> bool:
        """Whether every rank that reports progress completed a step since it started."""
        return bool(self._latest) and all(
            p.step is not None and p.resumed is not None and p.step > p.resumed for p in self._latest.values())

    def reconfigurable(self) -> bool:
        """Whether every rank declared that it can be reconfigured in-process (as of read())."""
        return len(self._latest) == len(self._paths) and all(p.reconfigurable for p in self._latest.values())

    def parked(self) -> bool:
        """Whether every rank is parked, waiting for its next round (as of read())."""
        return len(self._latest) == len(self._paths) and all(p.parked is not None for p in self._latest.values())

    def committed(self) -> list[Commit]:
        """The checkpoint commits every rank that reports commits has seen, oldest first,
        each with the longest stall any rank had for it."""
        seen = [p.commits for p in self._latest.values() if p.commits]
        if not seen:
            return []
        upto = min(commits[-1].step for commits in seen)
        by_step: dict[int, list[Commit]] = {}
        for commits in seen:
            for c in commits:
                if c.step <= upto:
                    by_step.setdefault(c.step, []).append(c)
        return [Commit(step, max(c.at for c in same), max(c.stall for c in same))
                for step, same in sorted(by_step.items())]

    def hung(self) -> list[Hang]:
        """Ranks that are hung (as of read())."""
        if self._limits.timeout <= 0:
            return []
        now = self._clock()
        hangs = []
        for rank, progress in self._latest.items():
            if progress.parked is not None:
                continue  # waits for the agent, which ends the wait itself (--grace)
            quiet = now - self._seen_at[rank]
            first = self._limits.first_step_timeout
            if progress.step is None and quiet > first:
                hangs.append(Hang(rank, f"no first step within {first:g}s"))
                continue
            limit = self._limits.limit(self._slowest.get(rank), self._steps_seen.get(rank, 0))
            if progress.step is not None and quiet > limit:
                calibrated = "" if limit == self._limits.timeout else (
                    f" (calibrated: {self._limits.factor:g} x its slowest step, {self._slowest[rank]:.3g}s)")
                hangs.append(Hang(rank, f"no step for {limit:.3g}s after step {progress.step}{calibrated}"))
        return hangs
