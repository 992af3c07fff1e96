"""Data loading off the critical path: TrainLoop(num_workers=2) against a hand-written DDP loop
over DataLoader(num_workers=2) on the same samples, and against TrainLoop(num_workers=0); plus
what the sampler costs at 10^9 samples.

Run:  python benchmarks/bench_data_loading.py [--worlds 1 2] [--steps 12] [--rounds 5] [--load-ms 2]

Each sample's __getitem__ burns --load-ms of CPU (a busy loop, as decoding or tokenising
would), the model is small, so loading dominates a step. For each world size, --world-size
local processes (gloo, CPU, OMP_NUM_THREADS=1) run the three loops in turn, --rounds times
(alternating cancels drift in the machine's load); each block builds its own DataLoader (the
workers' start-up is outside the timed steps: a block's time runs from its first step's start
to its last step's start). Rank 0 prints per-step medians and the ratios TrainLoop(2) /
hand-written(2) (target <= 1.03) and TrainLoop(0) / TrainLoop(2) (how much the workers save;
at most about min(workers + 1, free cores) on a machine that is not otherwise busy).

Sampler: tracemalloc's peak while building steps of the Feistel order at N = 10^7 and 10^9,
and the time per step, next to the permutation earlier releases materialised per epoch
(measured at 10^7; at 10^9 it would hold 8 GB per rank).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from elastic.host.net import free_port  # noqa: E402

WIDTH, N_SAMPLES = 32, 4096


class SlowDataset:
    """Samples whose loading costs `load_ms` of CPU each."""

    def __init__(self, load_ms: float) -> None:
        self.load_s = load_ms / 1e3

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int):
        import torch

        end = time.thread_time() + self.load_s
        while time.thread_time() < end:
            pass
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(WIDTH, generator=g), int(i) % 10


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    import elastic

    ctx = elastic.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))
    if ctx.world_size > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = SlowDataset(args.load_ms)
    g, m, steps = args.global_batch, args.micro_batch, args.steps

    def trainloop(num_workers: int) -> list[float]:
        loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=dataset, global_batch_size=g,
                                 micro_batch_size=m, max_steps=steps, num_workers=num_workers)
        starts = []
        for step in loop:
            starts.append(time.perf_counter())
            for x, y in step:
                step.backward(F.cross_entropy(model(x), y))
        return starts

    def handwritten() -> list[float]:
        # The same id lists the TrainLoop loads (its own batch sampler, built before timing).
        loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=dataset, global_batch_size=g,
                                 micro_batch_size=m, max_steps=steps)
        a = loop.plan.accumulation_steps
        ids = [list(loop.sampler.samples(s).ids[mb.start: mb.stop]) for s in range(steps)
               for mb in loop.micro_batches]
        loader = DataLoader(dataset, batch_sampler=ids, num_workers=2)
        starts = []
        for k, (x, y) in enumerate(loader):
            if k % a == 0:
                starts.append(time.perf_counter())
            weight = len(y) * ctx.world_size / g
            if k % a < a - 1 and ctx.world_size > 1:
                with model.no_sync():
                    (F.cross_entropy(model(x), y) * weight).backward()
            else:
                (F.cross_entropy(model(x), y) * weight).backward()
            if k % a == a - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return starts

    times: dict[str, list[float]] = {"hand-written(2)": [], "TrainLoop(2)": [], "TrainLoop(0)": []}
    for _ in range(args.rounds):
        for name, run in (("hand-written(2)", handwritten), ("TrainLoop(2)", lambda: trainloop(2)),
                          ("TrainLoop(0)", lambda: trainloop(0))):
            if ctx.world_size > 1:
                dist.barrier()
            starts = run()
            times[name].append((starts[-1] - starts[1]) / (len(starts) - 2))  # from the 2nd step: warm
    if ctx.rank == 0:
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"world size {ctx.world_size}, G={g}, m={m}, {args.load_ms} ms CPU per sample, "
              f"{steps} steps x {args.rounds} rounds: "
              + ", ".join(f"{name} {t * 1e3:.1f} ms/step" for name, t in med.items()))
        print(f"  TrainLoop(2) / hand-written(2) = {med['TrainLoop(2)'] / med['hand-written(2)']:.3f} "
              f"(target <= 1.03); TrainLoop(0) / TrainLoop(2) = {med['TrainLoop(0)'] / med['TrainLoop(2)']:.2f}x",
              flush=True)


def sampler_costs() -> None:
    import numpy as np

    from elastic.worker.sampler import ElasticSampler

    def measure(build, label: str) -> tuple[float, float]:
        """(peak traced memory, seconds) of `build`: timed without tracemalloc, which slows Python."""
        t = time.perf_counter()
        build()
        elapsed = time.perf_counter() - t
        tracemalloc.start()
        build()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  {label}: peak {peak / 2**20:.3f} MiB, {elapsed * 1e6:.0f} us", flush=True)
        return peak, elapsed

    def steps(sampler: ElasticSampler) -> None:
        for s in range(10**5, 10**5 + 100):
            sampler.samples(s)

    print("sampler (one rank):")
    old_peak, old_time = measure(lambda: np.random.default_rng([0, 0]).permutation(10**7)[:1024],
                                 "materialised permutation, N=10^7, the first step of an epoch")
    for n in (10**7, 10**9):
        for g in (8, 1024):
            peak, elapsed = measure(lambda: steps(ElasticSampler(n, g, seed=0)), f"Feistel order, N={n:.0e}, G={g}, 100 steps")
            print(f"    {elapsed / 100 * 1e6:.0f} us per step; vs the materialised first step at N=10^7: "
                  f"{old_time / (elapsed / 100):.0f}x less time, {old_peak / peak:.0f}x less memory")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--load-ms", type=float, default=2.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    for world in args.worlds:
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds),
                 "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
                 "--load-ms", str(args.load_ms)], env=env))
        code = max(proc.wait() for proc in procs)
        if code:
            return code
    sampler_costs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
