"""How much a process wanted a CPU: its CPU time (every thread, live or exited) plus the time
its live threads spent runnable, waiting for a CPU (Linux /proc; schedstats).

In lock-step training every rank's wall-clock step takes as long as the slowest rank's, so
wall time cannot tell which rank is slow; busy time can: a rank that waits for its peers in
a collective sleeps, while the slow one computes, or waits for a CPU it shares (a noisy
neighbour, a busy thread, a CPU quota).
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds(pid: int) -> float | None:
    """CPU + run-queue seconds of process `pid` so far; None when it is gone (or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
        waited_ns = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    waited_ns += int(f.read().split()[1])  # run_delay: runnable, not running
            except (OSError, IndexError, ValueError):
                continue  # the thread exited meanwhile, or no schedstats in this kernel
    except (OSError, IndexError, ValueError):
        return None
    return cpu + waited_ns / 1e9
