"""Per-step overhead of elastic.TrainLoop against a hand-written DDP loop on the same model.

Run:  python benchmarks/bench_trainloop.py [--world-size 2] [--steps 20] [--rounds 11] [--width 512]

Starts --world-size local worker processes (gloo, CPU, OMP_NUM_THREADS=1). Each worker runs
both loops on one DDP model and the same in-memory dataset: same micro-batches, same
default_collate, same optimizer; the hand-written loop uses no_sync on all but the last
micro-step exactly as the TrainLoop does. The two alternate in blocks of --steps steps
(rounds) so load from other processes hits both alike; rank 0 prints the best round of each and the TrainLoop's
overhead in percent (target <= 2%), as the median of the per-round ratios. Checkpointing is off: it is I/O, not loop
overhead, and is measured by the checkpoint benchmarks.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import default_collate

    import elastic
    from elastic.accumulation import AccumulationPlan
    from elastic.sampler import ElasticSampler

    ctx = elastic.init()
    torch.manual_seed(0)
    n = args.global_batch * args.steps
    x = torch.randn(n, args.width)
    y = torch.randint(0, 10, (n,))
    dataset = [(x[i], y[i]) for i in range(n)]
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, 10),
    ))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g, m = args.global_batch, args.micro_batch

    # The hand-written loop gets the same sample order and split, computed before timing.
    sampler = ElasticSampler(n, g, seed=0)
    plan = AccumulationPlan(g, m, ctx.world_size)
    micro = plan.micro_batches(ctx.rank)
    batches = [[sampler.samples(s).ids[mb.start : mb.stop] for mb in micro] for s in range(args.steps)]

    def handwritten() -> tuple[float, float]:
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
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
        return (time.perf_counter() - start) / args.steps, (time.process_time() - cpu) / args.steps

    # One TrainLoop runs all rounds (so its periodic SIGTERM agreement is amortised as in a
    # real run); at the start of every `steps`-th step's body, where no gradient is pending,
    # the hand-written loop runs one block of `steps` steps on the same model.
    loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=dataset,
                             global_batch_size=g, micro_batch_size=m,
                             max_steps=(args.rounds + 1) * args.steps + 1)
    times: dict[str, list[tuple[float, float]]] = {"handwritten": [], "trainloop": []}
    block_start = None
    for step in loop:
        if step.index % args.steps == 0:
            if block_start is not None:
                times["trainloop"].append(((time.perf_counter() - block_start[0]) / args.steps,
                                           (time.process_time() - block_start[1]) / args.steps))
            times["handwritten"].append(handwritten())
            dist.barrier()
            block_start = (time.perf_counter(), time.process_time())
        for xb, yb in step:
            step.backward(F.cross_entropy(model(xb), yb))
    # The first block of each warms up (allocator, DDP bucket rebuild).
    times = {name: t[1:] for name, t in times.items()}
    if ctx.rank == 0:
        print(f"world size {ctx.world_size}, G={g}, m={m}, accumulation steps "
              f"{plan.accumulation_steps}, width {args.width}, {args.steps} steps x {args.rounds} rounds")
        for i, clock in enumerate(("wall", "cpu")):
            hand = [t[i] for t in times["handwritten"]]
            ours = [t[i] for t in times["trainloop"]]
            # Rounds run the two loops back to back, so a per-round ratio cancels slow drift
            # in the machine's load; its median is the headline figure.
            paired = statistics.median(o / h for o, h in zip(ours, hand))
            print(f"{clock:4} time: hand-written {min(hand) * 1e3:7.3f} ms/step, TrainLoop "
                  f"{min(ours) * 1e3:7.3f} ms/step (best rounds); TrainLoop overhead "
                  f"{100 * (paired - 1):+.2f}% (median of per-round ratios; target <= 2%)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env))
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
