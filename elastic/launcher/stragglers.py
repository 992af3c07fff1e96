"""Stragglers: nodes whose ranks are much slower than the others', judged from the nodes'
status keys (elastic/rendezvous/status_key.py).

The measure is busy seconds per step (elastic/host/busy_time.py), not wall time: in
lock-step training every rank's step lasts as long as the slowest rank's, while the fast
ranks spend the difference asleep in a collective. A node is a straggler when its busiest
rank is busy more than `factor` x the median of the other nodes' and for at least half of
its step (the job waits for it). One agent judges (the first node of the running round),
every JUDGE_EVERY seconds; `elastic-run status` applies the same rule to what it reads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

from elastic.rendezvous.status_key import NodeStatus

JUDGE_EVERY = 2.0  # seconds between two judgments (one range read of the status keys each)


def find_stragglers(statuses: Mapping[str, NodeStatus], factor: float) -> list[str]:
    """The nodes among `statuses` that are stragglers by `factor` (0: never), sorted."""
    busy = {n: s.busy_per_step for n, s in statuses.items() if s.busy_per_step is not None and s.steps_per_s}
    if factor <= 0 or len(busy) < 2:
        return []
    ordered = sorted(busy.values())
    slow = []
    for node, seconds in busy.items():
        others = list(ordered)
        others.remove(seconds)
        step_time = 1.0 / statuses[node].steps_per_s
        if seconds > factor * statistics.median(others) and seconds >= 0.5 * step_time:
            slow.append(node)
    return sorted(slow)


class StragglerJudge:
    """Flags stragglers into the events log; with `exclude_after`, names one to exclude once
    it has been a straggler for that many seconds without a break."""

    def __init__(self, factor: float, exclude_after: float | None, emit: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factor = factor
        self._exclude_after = exclude_after
        self._emit = emit
        self._clock = clock
        self._since: dict[str, float] = {}  # flagged node -> when it was first flagged in a row

    def judge(self, statuses: Mapping[str, NodeStatus], round_: int) -> str | None:
        """Judge the nodes of `round_` (their statuses); the node to exclude now, if any."""
        running = {n: s for n, s in statuses.items() if s.round == round_ and s.state == "training"}
        flagged = find_stragglers(running, self._factor)
        now = self._clock()
        for node in flagged:
            if node not in self._since:
                self._since[node] = now
                others = [s.busy_per_step for n, s in running.items() if n != node and s.busy_per_step is not None]
                self._emit("straggler", round=round_, straggler=node, busy_per_step=running[node].busy_per_step,
                           median_others=statistics.median(others), factor=self._factor)
        for node in [n for n in self._since if n not in flagged]:
            del self._since[node]
            self._emit("straggler_cleared", round=round_, straggler=node)
        if self._exclude_after is None:
            return None
        due = [n for n in flagged if now - self._since[n] >= self._exclude_after]
        return due[0] if due else None
