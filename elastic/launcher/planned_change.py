"""Leaving a round the job moved on from, and the workers kept in-process across the change.

A failure elsewhere: our workers are stuck in collectives with a dead peer, so they are
killed at once. A planned change (growth, a peer leaving): SIGTERM first so that they save
their step, and SIGKILL after --grace. With --reconfigure, workers that declared they can
(a DDP TrainLoop) are not stopped: they park after a step they agree on, and the next round
hands them their new ranks (elastic/exchange/control.py); anything else, or any trouble on
the way, falls back to the stop and a fresh start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from elastic.launcher.config import LaunchConfig
from elastic.launcher.run_record import RunRecord
from elastic.launcher.worker_group import WorkerGroup

log = logging.getLogger(__name__)

PARK_POLL = 0.02  # seconds between looks at whether the workers have parked


class PlannedChange:
    """This node's side of a round change: stop or park its workers, hand parked ones on."""

    def __init__(self, config: LaunchConfig, record: RunRecord, signalled: Callable[[], bool]) -> None:
        self._config = config
        self._record = record
        self._signalled = signalled
        self._parked: WorkerGroup | None = None  # workers waiting in-process for the next round

    def leave(self, group: WorkerGroup, round_: int, *, failure: bool) -> None:
        """Leave `round_`, which ended by a `failure` elsewhere or a planned change."""
        if not failure and self._park(group, round_):
            self._parked = group
        else:
            self._record.result.exits = group.stop(0 if failure else self._config.grace)

    def hand_over(self, group: WorkerGroup) -> bool:
        """Give the parked workers, if any, their places in the new round's `group`."""
        if self._parked is None:
            return False
        group.adopt(self._parked)
        self._parked = None
        return True

    def stop_parked(self) -> None:
        """No round to hand the parked workers to (joining failed): stop them."""
        if self._parked is not None:
            self._parked.stop(self._config.grace)
            self._parked = None

    def _park(self, group: WorkerGroup, round_: int) -> bool:
        """Ask workers that can be reconfigured in-process to park after a step they agree on
        and commit; whether all did within --grace (else: stop them)."""
        if not self._config.reconfigure or not group.progress.reconfigurable():
            return False
        group.request_park()
        deadline = time.monotonic() + self._config.grace
        while group.running and not self._signalled() and time.monotonic() < deadline:
            group.progress.read()
            if group.progress.parked():
                self._record.progress(group.progress, round_, force=True)
                return True
            time.sleep(min(self._config.monitor_interval, PARK_POLL))
        log.warning("elastic-run: workers did not all park within --grace %gs; stopping them", self._config.grace)
        return False
