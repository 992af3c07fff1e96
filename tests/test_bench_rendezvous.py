"""The rendezvous benchmark's --quick mode runs end to end (tiny N) and reports correctness."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, child_env


def test_quick_bench_prints_the_table_and_churn_held():
    proc = subprocess.run(
        [sys.executable, f"{REPO}/benchmarks/bench_rendezvous.py", "--quick", "--agents", "4",
         "--trials", "2", "--ttl-trials", "0", "--c10d-agents", "", "--budget", "5"],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = {tuple(line.split()[:2]) for line in out.splitlines() if line[:5].strip().isdigit()}
    assert {("4", "join"), ("4", "join*"), ("4", "death"), ("4", "churn")} <= rows, out
    assert "FAILED" not in out, out
    assert "churn correct: yes" in out, out
    assert "<= 2 etcd writes per agent per round" in out, out
