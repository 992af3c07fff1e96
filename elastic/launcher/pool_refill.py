"""When to start the next warm spares (elastic/launcher/warm_pool.py): once the round is under
way, so that their imports never compete with the round's start."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from elastic.launcher.hang_watch import ProgressWatch

if TYPE_CHECKING:  # events imports memory_dir (via worker_group), which imports under_way() from here
    from elastic.launcher.events import EventLog
    from elastic.launcher.warm_pool import WarmPool

# Spares are started once the round's first step is done (their imports would slow the
# round's start), or this long after the round started, for workers that report no steps.
REFILL_DELAY = 10.0


def tend_pool(pool: WarmPool, progress: ProgressWatch, round_started: float, events: EventLog) -> None:
    """Start the next spares once the round is under way (`round_started`: monotonic time);
    log when they are ready."""
    if not pool.full and under_way(progress, round_started):
        pool.fill()
        events.emit("spares_started", pids=pool.pids)
    if pool.newly_ready():
        events.emit("spares_ready", pids=pool.pids)


def under_way(progress: ProgressWatch, round_started: float) -> bool:
    """Whether the round is past its start (`round_started`: monotonic time): its first step
    done, or REFILL_DELAY passed, for workers that report no steps."""
    return progress.first_step_done() or time.monotonic() - round_started >= REFILL_DELAY
