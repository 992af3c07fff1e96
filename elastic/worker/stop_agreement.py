"""The stop agreement: on SIGTERM every rank stops after the same step.

A planned change (a node arriving, a node leaving on SIGTERM, preemption of the whole job)
sends SIGTERM to some ranks only, and a rank that stopped alone would leave its peers hanging
in the next collective. So a SIGTERM is only a vote: at step boundaries the ranks agree on
whether to stop, and all of them stop after the same step S, which the loop then saves and
commits before it exits with PREEMPTED_EXIT_CODE. The agent's park request for a worker it
reconfigures in-process (elastic/exchange/control.py) is one more vote.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
import torch.distributed as dist

from elastic.exchange import control

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what the supervisor expects
STOP_CHECK_SECONDS = 0.25  # default wall time between SIGTERM agreements (well inside --grace)
MAX_CHECK_INTERVAL = 1000  # steps


def check_interval(mean_step_seconds: float, every: int | None) -> int:
    """Steps until the next SIGTERM agreement: `every` if given, else about STOP_CHECK_SECONDS
    worth of steps (at least 1; at most MAX_CHECK_INTERVAL)."""
    if every is not None:
        return every
    if mean_step_seconds <= 0.0:
        return 1
    return max(1, min(MAX_CHECK_INTERVAL, int(STOP_CHECK_SECONDS / mean_step_seconds)))


class StopAgreement:
    """Whether every rank stops now (asked at each step boundary, same on all ranks).

    The ranks agree by a MAX all-reduce of [local stop vote, local mean step time]. A
    collective costs ranks a rendezvous, so it runs only every `every` steps, or by default
    every STOP_CHECK_SECONDS of training: the interval to the next check is computed from the
    reduced (hence identical) step time, so all ranks check, and stop, after the same step.
    """

    def __init__(self, *, every: int | None, control_file: str | None) -> None:
        self.sigterm = False  # this process got SIGTERM (while `sigterm_handled()`)
        self._every = every
        self._control_file = control_file  # where the agent asks a reconfigurable worker to park
        self.restart(None)

    def restart(self, group: dist.ProcessGroup | None) -> None:
        """Agree within `group` (None: this rank alone), first at the next step boundary."""
        self._group = group
        self._next_check = 0  # the completed-step count at which ranks next agree on SIGTERM
        self._last_check: tuple[int, float] | None = None  # (completed steps, perf_counter)

    @contextmanager
    def sigterm_handled(self, rank: int) -> Iterator[None]:
        """Within the block, SIGTERM sets `sigterm` (this rank's vote) instead of ending the process."""

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.sigterm = True

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: preemption is then the caller's business
            log.warning("rank %d: TrainLoop not in the main thread; SIGTERM is not handled", rank)
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def agreed(self, completed: int) -> bool:
        """Whether every rank stops after `completed` steps (a collective when one is due)."""
        if self._group is None:
            return self.wanted()
        if completed < self._next_check:
            return False
        now = time.perf_counter()
        mean = 0.0
        if self._last_check is not None and completed > self._last_check[0]:
            mean = (now - self._last_check[1]) / (completed - self._last_check[0])
        agreed = torch.tensor([float(self.wanted()), mean], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
        self._last_check = (completed, now)
        self._next_check = completed + check_interval(agreed[1].item(), self._every)
        return bool(agreed[0].item())

    def wanted(self) -> bool:
        """This rank's vote: SIGTERM, or its agent asks it to park (elastic/exchange/control.py)."""
        return self.sigterm or (self._control_file is not None and control.park_requested(self._control_file))
