"""Argument parsing of benchmarks/bench_memory_recovery.py (the benchmark itself is run by hand)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "bench_memory_recovery.py")


def test_a_period_longer_than_the_duration_is_refused_in_one_line() -> None:
    done = subprocess.run([sys.executable, SCRIPT, "--duration", "5", "--period", "10", "--only", "goodput"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--duration 5 --period 10: the period must be > 0 and fit in the duration" in done.stderr
    assert done.stdout == ""  # refused before any job was started
