"""Each local rank's recent pace: steps per second and busy seconds per step over the last
WINDOW seconds, from the steps its progress record shows and its process's busy time
(elastic/host/busy_time.py). Sampled at each of the agent's checks, kept for one round."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from elastic.host.busy_time import busy_seconds

WINDOW = 5.0  # seconds of samples a rate is computed over


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    step: int
    busy: float


@dataclass(frozen=True)
class Pace:
    """The node's pace: its slowest rank's steps/s and its busiest rank's seconds per step."""

    steps_per_s: float
    busy_per_step: float | None


class RankRates:
    """Per-rank samples of (step, busy time); one instance per worker group."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: dict[int, deque[Sample]] = {}

    def sample(self, steps: dict[int, int | None], pids: dict[int, int]) -> list[int]:
        """Record each rank's step (rank -> step) and busy time (rank -> pid); the seconds of
        the steps completed since the previous sample, averaged per step (for a histogram)."""
        now = self._clock()
        per_step = []
        for rank, step in steps.items():
            samples = self._samples.get(rank)
            if step is None or rank not in pids or (samples and samples[-1].step == step):
                continue  # only a new step moves the window (a pause is not a pace): /proc is read then
            busy = busy_seconds(pids[rank])
            if busy is None:
                continue
            samples = self._samples.setdefault(rank, deque())
            if samples and step > samples[-1].step:
                per_step += [(now - samples[-1].at) / (step - samples[-1].step)] * min(step - samples[-1].step, 100)
            samples.append(Sample(now, step, busy))
            while len(samples) > 2 and now - samples[1].at >= WINDOW:
                samples.popleft()
        return per_step

    def pace(self) -> Pace | None:
        """None until some rank has two samples with steps between them."""
        now = self._clock()
        rates, busy = [], []
        for samples in self._samples.values():
            first, last = samples[0], samples[-1]
            steps = last.step - first.step
            if steps <= 0:
                continue
            rates.append(steps / (now - first.at))  # to now: a rank that stopped stepping slows down
            busy.append(max(0.0, last.busy - first.busy) / steps)
        if not rates:
            return None
        return Pace(steps_per_s=min(rates), busy_per_step=max(busy))
