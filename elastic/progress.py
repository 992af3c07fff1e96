"""Hang detection from outside the worker: watch the step counter each rank's loop reports.

A worker that uses `elastic.TrainLoop` (or calls `elastic.context.report_progress`) creates
its progress file at `elastic.init()` and rewrites it after every optimizer step. The agent
judges a rank hung when the file has not changed for `hang_timeout` seconds, or when no first
step arrived within `first_step_timeout` of the file's creation. A worker that never creates
the file (a plain torchrun script) is never judged hung. Reading the file costs one stat per
rank per check; a hang that holds the GIL cannot fake progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """What one rank's progress file says."""

    step: int | None  # last completed optimizer step; None before the first one
    changed_at: float  # wall-clock time of the last write


@dataclass(frozen=True)
class Hang:
    rank: int
    reason: str


def read_progress(path: str) -> Progress | None:
    """None when the rank does not report progress (no file)."""
    try:
        stat = os.stat(path)
        with open(path, "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return Progress(int(text) if text.isdigit() else None, stat.st_mtime)


class ProgressWatch:
    """Judges the ranks of one worker group hung or not."""

    def __init__(self, paths: dict[int, str], *, hang_timeout: float, first_step_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._paths = paths  # rank -> progress file
        self._hang_timeout = hang_timeout
        self._first_step_timeout = first_step_timeout
        self._clock = clock
        self._latest: dict[int, Progress] = {}  # rank -> progress, from the last read()
        for path in paths.values():  # left from an earlier round: not this group's progress
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def read(self) -> None:
        """Read every rank's progress file once; steps(), slowest() and hung() use this."""
        found = {rank: read_progress(path) for rank, path in self._paths.items()}
        self._latest = {rank: p for rank, p in found.items() if p is not None}

    def steps(self) -> dict[int, int | None]:
        """rank -> last completed step, for ranks that report progress (as of read())."""
        return {rank: p.step for rank, p in self._latest.items()}

    def slowest(self) -> Progress | None:
        """The least advanced rank's progress (with when it was written), among ranks that
        have completed a step (as of read())."""
        found = [p for p in self._latest.values() if p.step is not None]
        return min(found, key=lambda p: (p.step, p.changed_at)) if found else None

    def hung(self) -> list[Hang]:
        """Ranks that are hung (as of read())."""
        if self._hang_timeout <= 0:
            return []
        now = self._clock()
        hangs = []
        for rank, progress in self._latest.items():
            quiet = now - progress.changed_at
            if progress.step is None and quiet > self._first_step_timeout:
                hangs.append(Hang(rank, f"no first step within {self._first_step_timeout:g}s"))
            elif progress.step is not None and quiet > self._hang_timeout:
                hangs.append(Hang(rank, f"no step for {self._hang_timeout:g}s after step {progress.step}"))
        return hangs
