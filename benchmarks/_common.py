"""What the benchmarks share, with each other and with the tests (tests/helpers.py re-uses it):
reading JSON-lines records, waiting for a condition, percentiles.

A benchmark runs as a script, so it imports this as `_common` (its own directory is on
sys.path); the tests import `benchmarks._common`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file that is still being written: none before it exists,
    and not a last line that is not complete yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_until(what: str, check: Callable[[], Any], timeout: float, *,
               alive: Callable[[], str | None] | None = None, poll: float = 0.02,
               error: type[Exception] = AssertionError) -> Any:
    """Poll `check` until it returns something truthy (returned); raise `error` at the
    deadline, or at once when `alive` returns a reason (a process we depend on has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if alive is not None:
            dead = alive()
            if dead:
                raise error(f"while waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


def exited(procs: Iterable[subprocess.Popen], who: str) -> Callable[[], str | None]:
    """For wait_until's `alive`: "WHO exited CODE" once one of `procs` has exited."""
    procs = list(procs)

    def reason() -> str | None:
        return next((f"{who} exited {p.returncode}" for p in procs if p.poll() is not None), None)

    return reason


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, `q` in percent (p99 of 20 samples is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
