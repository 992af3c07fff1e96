"""The training job that benchmarks/bench_memory_recovery.py launches and kills.

Two shapes of one job, same model, same data, same state, world size W on gloo:
- `--mode loop`: elastic.TrainLoop with a CheckpointManager (memory_tier=True when
  --memory-save-every is given), run by `elastic-run --checkpoint-dir DIR`;
- `--mode torchrun`: the hand-written loop a torchrun user writes: rank 0 torch.save()s the
  whole state every --save-every steps (temp file, then rename), every rank torch.load()s the
  newest one at start.
The state is a small MLP (--hidden sets the compute per step) plus one float32 tensor of --mib
MiB that stands for the rest of a large model's parameters and optimizer state: it is saved
and restored with the rest, but costs no compute.

Per attempt (TORCHELASTIC_RESTART_COUNT) and rank it writes to --out:
  boot.a<attempt>.rank<r>.jsonl  {"started", "initialized" (process group up), "resumed" (times),
                                 "step" (resumed from), "tier", "pid"}
  steps.a<attempt>.rank<r>.jsonl  one line per step: {"step" (completed before it), "start", "end"}
where start..end is the step's compute (forward, backward; not the checkpoint stall).
With --kill-at N, rank --kill-rank of attempt 0 SIGKILLs itself once N steps are complete,
without waiting for a checkpoint in flight.
"""

from __future__ import annotations

import time

_STARTED = time.time()  # before the imports: a restarted rank pays them too

import argparse
import json
import os
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

IN = 32
N_SAMPLES = 256


def build_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def build_dataset() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, IN, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return [(x[i], y[i]) for i in range(N_SAMPLES)]


def bulk_state(mib: int) -> torch.Tensor:
    return torch.full((mib * (1 << 20) // 4,), 0.5)


class Recorder:
    def __init__(self, out: str, attempt: int, rank: int) -> None:
        self.out, self.attempt, self.rank = out, attempt, rank
        self.initialized = time.time()
        self._steps = open(os.path.join(out, f"steps.a{attempt}.rank{rank}.jsonl"), "a", buffering=1)

    def boot(self, step: int | None, tier: str | None) -> None:
        with open(os.path.join(self.out, f"boot.a{self.attempt}.rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps({"started": _STARTED, "initialized": self.initialized, "resumed": time.time(),
                                "step": step or 0, "tier": tier, "pid": os.getpid()}) + "\n")

    def step(self, completed: int, start: float) -> None:
        self._steps.write(json.dumps({"step": completed, "start": start, "end": time.time()}) + "\n")


def run_loop(args: argparse.Namespace, rec: Recorder, model: torch.nn.Module, kill) -> None:
    import elastic
    from checkpoint import CheckpointManager

    ckpt = CheckpointManager(os.environ["ELASTIC_CHECKPOINT_DIR"], keep_last=3,
                             memory_tier=args.memory_save_every is not None)
    loop = elastic.TrainLoop(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), dataset=build_dataset(),
        global_batch_size=args.global_batch, micro_batch_size=args.global_batch // dist.get_world_size(),
        max_steps=args.max_steps, checkpoint=ckpt, save_every=args.save_every,
        memory_save_every=args.memory_save_every, extra_state={"bulk": bulk_state(args.mib)}, seed=5,
    )
    resumed = loop.resume()
    rec.boot(resumed, ckpt.restored.tier if ckpt.restored else None)
    for step in loop:
        kill(step.index)
        start = time.time()
        for x, y in step:
            step.backward(F.mse_loss(model(x), y))
        rec.step(step.index, start)
    ckpt.close()


def run_plain(args: argparse.Namespace, rec: Recorder, model: torch.nn.Module, kill) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    bulk = bulk_state(args.mib)
    data = build_dataset()
    path = os.path.join(args.ckpt, "state.pt")
    completed = 0
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        bulk.copy_(saved["bulk"])
        completed = saved["step"]
    rec.boot(completed, "durable" if completed else None)
    per_rank = args.global_batch // world
    while completed < args.max_steps:
        kill(completed)
        start = time.time()
        first = (completed * args.global_batch + rank * per_rank) % N_SAMPLES
        batch = [data[(first + i) % N_SAMPLES] for i in range(per_rank)]
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        F.mse_loss(model(x), y).backward()
        rec.step(completed, start)
        optimizer.step()
        optimizer.zero_grad()
        completed += 1
        if completed % args.save_every == 0 and rank == 0:
            torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                        "bulk": bulk, "step": completed}, path + ".tmp")
            os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["loop", "torchrun"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", help="--mode torchrun: the checkpoint directory")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--memory-save-every", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rec = Recorder(args.out, attempt, dist.get_rank())

    def kill(completed: int) -> None:
        if attempt == 0 and completed == args.kill_at and dist.get_rank() == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    model = DistributedDataParallel(build_model(args.hidden))
    (run_loop if args.mode == "loop" else run_plain)(args, rec, model, kill)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
