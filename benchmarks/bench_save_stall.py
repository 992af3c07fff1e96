"""Training time lost per checkpoint by elastic.TrainLoop, with and without overlap_save.

Run:  python benchmarks/bench_save_stall.py [--width 1024] [--steps 20] [--save-every 5] [--rounds 7]

One process (world size 1, one torch thread), a 4-layer MLP trained with SGD and momentum
(parameters + momentum = 32 MB at width 1024), one micro-batch per step. Three modes run in
interleaved rounds of --steps steps, each round a fresh TrainLoop on a fresh checkpoint
directory: no checkpoints, saves every --save-every steps, and the same with overlap_save.
For each mode it prints, as medians over rounds:
- stall: time the training thread spends inside CheckpointManager.save() plus, with overlap,
  waiting in the next optimizer.step() for the snapshot copy, per checkpoint;
- cost: (round time - round time without checkpoints) / checkpoints per round, which also
  counts the background hashing and writing competing with training for the CPU.
The final save at the end of a round and the wait for its commit are outside both figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import elastic  # noqa: E402
from checkpoint import CheckpointManager  # noqa: E402


class TimedCheckpointer:
    """A CheckpointManager that adds up the time its caller spends in save/wait_snapshot."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.stalled = 0.0

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stalled += time.perf_counter() - start

    def save(self, step: int, state: Mapping[str, Any], metrics: Any = None, **kw: Any) -> None:
        self._timed(self.manager.save, step, state, metrics, **kw)

    def wait_snapshot(self) -> None:
        self._timed(self.manager.wait_snapshot)

    def wait(self) -> None:
        self.manager.wait()

    def load(self, state: Any, step: int | None = None) -> int | None:
        return self.manager.load(state, step)

    def set_commit_guard(self, guard: Any) -> None:
        self.manager.set_commit_guard(guard)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(*[layer for _ in range(3) for layer in (torch.nn.Linear(w, w), torch.nn.ReLU())],
                                torch.nn.Linear(w, w))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    data = torch.randn(args.batch * args.steps, w)
    dataset = [(x, x) for x in data]
    saves = args.steps // args.save_every
    stalled = elapsed = 0.0
    modes = {"none": None, "sync": False, "overlap": True}
    stall: dict[str, list[float]] = {m: [] for m in modes}
    total: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-save-stall-") as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, overlap in modes.items():
                manager = CheckpointManager(os.path.join(tmp, f"{name}{r}"), keep_last=1)
                timed = TimedCheckpointer(manager)
                loop = elastic.TrainLoop(
                    model=model, optimizer=optimizer, dataset=dataset, global_batch_size=args.batch,
                    micro_batch_size=args.batch, max_steps=args.steps, checkpoint=timed,
                    save_every=None if overlap is None else args.save_every, overlap_save=bool(overlap))
                start = time.perf_counter()
                for step in loop:
                    for x, y in step:
                        step.backward(F.mse_loss(model(x), y))
                    if step.index == args.steps - 1:  # stop the clock before the final save
                        stalled, elapsed = timed.stalled, time.perf_counter() - start
                manager.close()
                if r:
                    stall[name].append(stalled)
                    total[name].append(elapsed)
    base = statistics.median(total["none"])
    mb = sum(t.numel() * t.element_size() for t in model.parameters()) * 2 / 2**20
    timed_saves = saves - (args.steps % args.save_every == 0)  # a save after the last step is not timed
    print(f"width {w}: {mb:.0f} MB of parameters + momentum, {args.steps} steps per round, a save every "
          f"{args.save_every} steps ({timed_saves} timed per round), {args.rounds} rounds; "
          f"{1e3 * base / args.steps:.1f} ms/step without checkpoints")
    for name in ("sync", "overlap"):
        per_ckpt = statistics.median(stall[name]) / timed_saves
        cost = (statistics.median(total[name]) - base) / timed_saves
        print(f"overlap_save={name == 'overlap'!s:5}: stall {1e3 * per_ckpt:6.2f} ms per checkpoint, "
              f"cost {1e3 * cost:6.2f} ms per checkpoint (round time vs no checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
