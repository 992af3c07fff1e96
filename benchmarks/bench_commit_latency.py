"""Commit latency of a CheckpointManager with many checkpoints already present.

Run:  python benchmarks/bench_commit_latency.py [--present 100] [--commits 20]

One process (no process group), a tiny state (one 1,024-float tensor and a metric), so the
figures are the commit's own overhead, not the shard write. --present checkpoints of this
run are committed first; then a manager with keep_last=--present saves --commits more steps
(each commit lets the oldest go, so --present stay). For a local directory and memory://,
as medians over the commits, it prints:
- committed: from save() to the commit listener (the outcome every rank waits for);
- done: from save() to wait() returning (rank 0's background work, retention included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import CheckpointManager  # noqa: E402


def measure(url: str, present: int, commits: int) -> tuple[float, float]:
    """Median seconds (committed, done) per commit with `present` checkpoints in `url`."""
    state = {"w": torch.arange(1024, dtype=torch.float32)}
    with CheckpointManager(url, async_write=False) as filler:
        for step in range(present):
            filler.save(step, state, metrics={"loss": float(step)})
    committed, done = [], []
    with CheckpointManager(url, keep_last=present) as ckpt:
        listened: list[float] = []
        ckpt.set_commit_listener(lambda step, held, tier: listened.append(time.perf_counter()))
        for step in range(present, present + commits):
            started = time.perf_counter()
            ckpt.save(step, state, metrics={"loss": float(step)})
            ckpt.wait()
            done.append(time.perf_counter() - started)
            committed.append(listened[-1] - started)
        assert len(ckpt.steps()) == present, ckpt.steps()
    return statistics.median(committed), statistics.median(done)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--present", type=int, default=100)
    p.add_argument("--commits", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("local", os.path.join(tmp, "ckpt")), ("memory://", f"memory://bench-{uuid.uuid4().hex}")):
            committed, done = measure(url, args.present, args.commits)
            print(f"{name:10s} {args.present} present: committed {committed * 1e3:7.1f} ms   "
                  f"done {done * 1e3:7.1f} ms (median of {args.commits})", flush=True)


if __name__ == "__main__":
    main()
