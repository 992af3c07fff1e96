"""A tiny float64 training job driven by elastic.TrainLoop, launched by the tests.

Run under a torchrun-style environment (or none, for world size 1). Writes, per rank,
JSON lines {"step", "world", "A", "ids", "t", "pid", "round"} to <out>/ids.<tag>.rank<r>.jsonl, where "ids" are
the sample ids found in the batches the loop fed this rank (zero-weight repeats excluded),
and rank 0 writes the final parameters to <out>/params.<tag>.pt. Each process also appends its
start-up timestamps (started, imported, initialized = process group up, resumed =
checkpoint loaded) to <out>/boot.<tag>.rank<r>.jsonl. Under a supervisor
restart n (TORCHELASTIC_RESTART_COUNT) writes under the tag "<tag>.restart<n>". A worker that
elastic-run reconfigures in-process (--ddp) goes on writing under its new rank. With
--num-workers each DataLoader worker process appends {"pid", "parent", "round"} (its pid, the
training process's, the rendezvous round it was started in) to <out>/loader_pids.<tag>.
"""

from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: the recovery benchmark splits spawn from import

import argparse
import functools
import json
import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

import elastic

N_SAMPLES = 30


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


def build_dataset() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 4, dtype=torch.float64, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return [(x[i], y[i], i) for i in range(N_SAMPLES)]


def record_pid(path: str, worker_id: int) -> None:
    """A DataLoader worker_init_fn: note this loader worker's pid (tests check that it ends)."""
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "parent": os.getppid(),
                            "round": os.environ.get("ELASTIC_ROUND")}) + "\n")


def loader_workers(path: str) -> list[dict]:
    """The records record_pid wrote to `path`."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="run")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--global-batch", type=int, default=7)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=None,
                   help="rank 1 SIGKILLs itself at this step (first attempt only)")
    p.add_argument("--pause-at", type=int, default=None, help="all ranks wait for a stdin line here")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds each step sleeps (paces a job that chaos tests interrupt)")
    p.add_argument("--slow-while", default=None, metavar="FILE",
                   help="each step sleeps 1 s (instead of --step-delay) while FILE exists, so that a "
                   "test can keep the job running until a fault and its repair have played out")
    p.add_argument("--slow-commit", type=float, default=0.0,
                   help="first attempt only: each checkpoint commit (manifest write) waits this long "
                   "after every rank's files are written, so a test can fail a save in flight")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--ddp", action="store_true",
                   help="wrap in DDP at world size 1 too (elastic-run can then reconfigure it in-process)")
    p.add_argument("--overlap-save", action="store_true", help="TrainLoop(overlap_save=True)")
    p.add_argument("--num-workers", type=int, default=0, help="TrainLoop(num_workers=N): DataLoader workers")
    p.add_argument("--compile", action="store_true", help="torch.compile the (wrapped) model, backend eager")
    p.add_argument("--hidden", type=int, default=8, help="a different model for mismatch tests")
    p.add_argument("--setup-seconds", type=float, default=0.0,
                   help="sleep this long before building the loop: stands for a real script's set-up "
                   "(opening the data set, CUDA start-up) that a restarted rank repeats")
    args = p.parse_args()

    imported = time.time()
    ctx = elastic.init()
    time.sleep(args.setup_seconds)
    initialized = time.time()
    model = build_model()
    if args.hidden != 8:
        model[0] = torch.nn.Linear(4, args.hidden).double()
        model[2] = torch.nn.Linear(args.hidden, 1).double()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(model)
    elif ctx.world_size > 1 or (args.ddp and torch.distributed.is_initialized()):
        model = DistributedDataParallel(model)
    if args.compile:
        model = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    ckpt = None
    if args.ckpt or os.environ.get("ELASTIC_CHECKPOINT_DIR"):  # --ckpt, or elastic-run's --checkpoint-dir
        from checkpoint import CheckpointManager

        ckpt = CheckpointManager(args.ckpt or ctx.checkpoint_dir, keep_last=2)
        if args.slow_commit and ctx.restart_count == 0:
            from checkpoint.io import storage

            commit = storage.commit

            def slow_commit(*a, **kw):
                time.sleep(args.slow_commit)
                return commit(*a, **kw)

            storage.commit = slow_commit
    tag = args.tag if ctx.restart_count == 0 else f"{args.tag}.restart{ctx.restart_count}"
    kill_at = args.kill_at if ctx.restart_count == 0 else None
    loop = elastic.TrainLoop(
        model=model, optimizer=optimizer, dataset=build_dataset(),
        global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
        checkpoint=ckpt, save_every=args.save_every, max_steps=args.max_steps, seed=5,
        scheduler=scheduler, stop_check_every=1,  # deterministic stop step for the SIGTERM test
        overlap_save=args.overlap_save, num_workers=args.num_workers,
        worker_init_fn=functools.partial(record_pid, os.path.join(args.out, f"loader_pids.{tag}"))
        if args.num_workers else None,
    )
    print(f"rank {ctx.rank} resumed {loop.resume()}", flush=True)
    with open(os.path.join(args.out, f"boot.{tag}.rank{ctx.rank}.jsonl"), "a") as boot:
        boot.write(json.dumps({"started": _STARTED, "imported": imported, "initialized": initialized,
                               "resumed": time.time(), "pid": os.getpid(),
                               "round": os.environ.get("ELASTIC_ROUND")}) + "\n")
    for step in loop:
        if step.index == kill_at:
            ckpt.wait()
            if ctx.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        if step.index == args.pause_at:
            print(f"paused at {step.index}", flush=True)
            sys.stdin.readline()
        if args.slow_while and os.path.exists(args.slow_while):
            time.sleep(1.0)
        elif args.step_delay:
            time.sleep(args.step_delay)
        ids = []
        for x, y, i in step:
            step.backward(F.mse_loss(model(x), y))
            if step.micro_batch.size:
                ids.extend(i.tolist())
        with open(os.path.join(args.out, f"ids.{tag}.rank{loop.rank}.jsonl"), "a") as records:
            records.write(json.dumps({"step": step.index, "world": step.world_size,
                                      "A": step.accumulation_steps, "ids": ids,
                                      "t": time.time(), "pid": os.getpid(),
                                      "round": os.environ.get("ELASTIC_ROUND")}) + "\n")
    # Collective for FSDP2 (full_state_dict gathers the shards); keys without DDP's prefix.
    module = getattr(model, "_orig_mod", model)  # a compiled model's keys without "_orig_mod."
    params = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    if loop.rank == 0:
        torch.save(params, os.path.join(args.out, f"params.{tag}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
