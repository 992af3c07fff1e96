"""Per-step overhead of elastic.TrainLoop against a hand-written DDP loop on the same model.

Run:  python benchmarks/bench_trainloop.py [--world-size 2] [--width 512] [--steps 20] [--rounds 21]
      python benchmarks/bench_trainloop.py --instructions [--width 128]

Each worker runs both loops on one DDP model and the same in-memory dataset: same
micro-batches, same default_collate, same optimizer; the hand-written loop uses no_sync on
all but the last micro-step exactly as the TrainLoop does. The TrainLoop runs as under
elastic-run: a progress file (the heartbeat) and a CheckpointManager are attached, with no
periodic saves (checkpoint I/O is measured by bench_checkpoint.py and the save stall by
bench_save_stall.py). The two loops alternate in blocks of --steps steps (rounds); the first
round warms up and is dropped.

Wall clock (default): --world-size local processes (gloo, CPU, OMP_NUM_THREADS=1). Per-round
ratios TrainLoop/hand-written cancel slow drift in the machine's load; rank 0 prints their
median with a 95% bootstrap confidence interval, for wall and CPU time (target <= 2%).

Instructions (--instructions): one world-size-1 worker (still DDP over a 1-rank gloo group)
under valgrind's callgrind, which counts the instructions each block executes, whatever the
machine's load. The worker marks block boundaries with os.getppid() and callgrind dumps its
counters before every call (--dump-before=getppid), one file per block. Instruction counts
are not time (Python bookkeeping runs at a lower IPC than the BLAS kernels), but they are
repeatable to a fraction of a percent, so they show the loop's own cost without noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from elastic.host.net import free_port  # noqa: E402


class Segments:
    """Consecutive named segments of the worker's run, split by `mark(name)`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.times: list[tuple[float, float]] = []  # (wall, cpu) seconds of each closed segment
        self._start: tuple[float, float] | None = None

    def mark(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._start is not None:
            self.times.append((now[0] - self._start[0], now[1] - self._start[1]))
        os.getppid()  # the boundary callgrind dumps at (a no-op cost otherwise)
        self.names.append(name)
        self._start = (time.perf_counter(), time.process_time())


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import default_collate

    import elastic
    from checkpoint import CheckpointManager
    from elastic.worker.accumulation import AccumulationPlan
    from elastic.worker.sampler import ElasticSampler

    ctx = elastic.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g, m = args.global_batch, args.micro_batch
    steps = (args.rounds + 1) * args.steps + 1
    n = g * steps
    x = torch.randn(n, args.width)
    y = torch.randint(0, 10, (n,))
    dataset = [(x[i], y[i]) for i in range(n)]
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, 10),
    ))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    # The hand-written loop gets the same sample order and split, computed before timing.
    sampler = ElasticSampler(n, g, seed=0)
    plan = AccumulationPlan(g, m, ctx.world_size)
    micro = plan.micro_batches(ctx.rank)
    batches = [[sampler.samples(s).ids[mb.start : mb.stop] for mb in micro] for s in range(args.steps)]

    def handwritten() -> None:
        for step_ids in batches:
            for a, ids in enumerate(step_ids):
                xb, yb = default_collate([dataset[i] for i in ids])
                if a < len(step_ids) - 1:
                    with model.no_sync():
                        (F.cross_entropy(model(xb), yb) * (len(ids) * ctx.world_size / g)).backward()
                else:
                    (F.cross_entropy(model(xb), yb) * (len(ids) * ctx.world_size / g)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if ctx.world_size > 1:
            dist.barrier()

    # One TrainLoop runs all rounds (so its periodic SIGTERM agreement is amortised as in a
    # real run); at the start of every `steps`-th step's body, where no gradient is pending,
    # the hand-written loop runs one block of `steps` steps on the same model. Each block
    # starts after a barrier and ends unsynchronised, for both loops alike.
    segments = Segments()
    with CheckpointManager(args.checkpoint_dir) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=dataset,
                                 global_batch_size=g, micro_batch_size=m, max_steps=steps,
                                 checkpoint=ckpt)
        for step in loop:
            if step.index % args.steps == 0:
                segments.mark("sync")
                sync()
                segments.mark("handwritten")
                handwritten()
                segments.mark("sync")
                sync()
                segments.mark("trainloop" if step.index < steps - 1 else "end")
            for xb, yb in step:
                step.backward(F.cross_entropy(model(xb), yb))
    if ctx.rank == 0:
        print(f"world size {ctx.world_size}, G={g}, m={m}, accumulation steps "
              f"{plan.accumulation_steps}, width {args.width}, {args.steps} steps x {args.rounds} "
              "rounds (+1 warm-up round)")
        with open(args.segments_file, "w") as f:
            json.dump({"names": segments.names, "times": segments.times}, f)


def blocks(names: list[str], values: list[float], steps: int) -> tuple[list[float], list[float]]:
    """Per-step values of the (hand-written, TrainLoop) blocks, warm-up round dropped."""
    hand = [v / steps for name, v in zip(names, values) if name == "handwritten"][1:]
    ours = [v / steps for name, v in zip(names, values) if name == "trainloop"][1:]
    return hand[: len(ours)], ours


def median_ci(ratios: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median of `ratios` and a 95% percentile-bootstrap confidence interval for it."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def report_wall(segments_file: str, steps: int) -> None:
    with open(segments_file) as f:
        data = json.load(f)
    for i, clock in enumerate(("wall", "cpu")):
        hand, ours = blocks(data["names"][:-1], [t[i] for t in data["times"]], steps)
        med, lo, hi = median_ci([o / h for o, h in zip(ours, hand)])
        print(f"{clock:4} time: hand-written {statistics.median(hand) * 1e3:7.3f} ms/step, TrainLoop "
              f"{statistics.median(ours) * 1e3:7.3f} ms/step (medians of {len(hand)} rounds); "
              f"TrainLoop overhead {100 * (med - 1):+.2f}% [95% CI {100 * (lo - 1):+.2f}%, "
              f"{100 * (hi - 1):+.2f}%] (median of per-round ratios; target <= 2%)")


def report_instructions(out_prefix: str, segments_file: str, steps: int) -> None:
    with open(segments_file) as f:
        names = json.load(f)["names"]
    # cg.out.k holds the instructions run before the k-th getppid call: segment k-1 (the
    # setup before the first mark is segment 0, unnamed). The final file is the tail.
    counts = []
    for k in range(2, len(names) + 1):
        with open(f"{out_prefix}.{k}") as f:
            found = re.search(r"^summary: (\d+)", f.read(), re.M)
        if found is None:
            raise SystemExit(f"{out_prefix}.{k}: no instruction summary; did callgrind finish?")
        counts.append(float(found.group(1)))
    if os.path.exists(f"{out_prefix}.{len(names) + 1}"):
        raise SystemExit("more callgrind dumps than marks: something else called getppid")
    hand, ours = blocks(names[:-1], counts, steps)
    ratios = [o / h for o, h in zip(ours, hand)]
    print(f"instructions per step: hand-written {statistics.median(hand) / 1e6:.3f} M, TrainLoop "
          f"{statistics.median(ours) / 1e6:.3f} M (medians of {len(hand)} rounds; "
          f"per-round spread {100 * (max(hand) / min(hand) - 1):.2f}% and "
          f"{100 * (max(ours) / min(ours) - 1):.2f}%)")
    print(f"TrainLoop overhead {100 * (statistics.median(ratios) - 1):+.2f}% of instructions "
          f"(per round: {', '.join(f'{100 * (r - 1):+.2f}%' for r in ratios)}); "
          f"{(statistics.median(ours) - statistics.median(hand)) / 1e3:.1f} k instructions per step")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--instructions", action="store_true",
                   help="count instructions under callgrind (world size 1) instead of timing")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=None, help="default 21 (wall) or 5 (--instructions)")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--segments-file", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.instructions else 21
    if args.worker:
        worker(args)
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind on the PATH")
        args.world_size = 1
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-trainloop-") as tmp:
        segments_file = os.path.join(tmp, "segments.json")
        cg_out = os.path.join(tmp, "cg.out")
        worker_args = [__file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds),
                       "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
                       "--width", str(args.width), "--segments-file", segments_file,
                       "--checkpoint-dir", os.path.join(tmp, "ckpt")]
        prefix = [sys.executable]
        if args.instructions:
            prefix = ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={cg_out}",
                      "--dump-before=getppid", "--dump-instr=no", sys.executable]
        procs = []
        for rank in range(args.world_size):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONHASHSEED="0", ELASTIC_PROGRESS_FILE=os.path.join(tmp, f"progress.{rank}"),
                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(prefix + worker_args, env=env))
        code = max(p.wait() for p in procs)
        if code:
            return code
        if args.instructions:
            report_instructions(cg_out, segments_file, args.steps)
        else:
            report_wall(segments_file, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
