"""A job that saves into the checkpoint memory tier every step, run by `elastic-run`.

Tiny linear regression over a global batch of PARTS parts: rank r of a world of W takes the
gradients of parts r, r+W, ..., an all-reduce sums them, every rank applies the mean with
momentum. The state is two float64 tensors of one size (weights, momentum), so each of 2 ranks
writes one shard (the writing is split by bytes), and `reference()` (the same updates in one
process) is bitwise what an uninterrupted job of 2 ranks ends with, and within rounding what a
job that changed its world size ends with.

Usage: memory_worker.py OUT_DIR PAUSE_STEP[,PAUSE_STEP...]
On restart r, rank 1 stops after committing step PAUSE_STEP[r] into memory: it writes
OUT_DIR/paused-<step>.json (pid, memory directory, node id) and sleeps until the test kills
it. Every rank appends what load() restored (step, tier, bytes read from other nodes' memory,
warnings, world size, its node) to
OUT_DIR/restores.jsonl, and rank 0 writes the final weights to OUT_DIR/final.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings

import torch

STEPS = 10
LR = 0.1
MOMENTUM = 0.9
PARTS = 2  # of the global batch: one per rank at world size 2


def gradient(w: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = x.sum(1, keepdim=True)
    w = w.detach().clone().requires_grad_()
    ((x @ w - y) ** 2).mean().backward()
    return w.grad


def update(w: torch.Tensor, m: torch.Tensor, summed: torch.Tensor) -> None:
    m.mul_(MOMENTUM).add_(summed / PARTS)
    w.sub_(LR * m)


def local_gradient(w: torch.Tensor, step: int, rank: int, world: int) -> torch.Tensor:
    """The sum of this rank's parts' gradients (zeros for a rank with none: world > PARTS)."""
    return sum((gradient(w, step, part) for part in range(rank, PARTS, world)), torch.zeros_like(w))


def reference() -> list[float]:
    w, m = torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    for step in range(STEPS):
        update(w, m, local_gradient(w, step, 0, 1))
    return w.flatten().tolist()


def main(out: str, pauses: list[int]) -> None:
    import torch.distributed as dist

    from checkpoint import CheckpointManager

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    ckpt = CheckpointManager(os.environ["ELASTIC_CHECKPOINT_DIR"], memory_tier=True)
    w, m = torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    state = {"w": w, "m": m}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ckpt.load(state)
    with open(os.path.join(out, "restores.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, "restart": restart, "step": loaded,
                            "tier": ckpt.restored.tier if ckpt.restored else None, "world": world,
                            "node": os.environ["ELASTIC_NODE_ID"],
                            "peer_bytes": ckpt.restored.peer_bytes if ckpt.restored else 0,
                            "warnings": [str(c.message) for c in caught]}) + "\n")
    for step in range(loaded or 0, STEPS):
        summed = local_gradient(w, step, rank, world)
        dist.all_reduce(summed)
        update(w, m, summed)
        ckpt.save(step + 1, state, durable=False)
        ckpt.wait()  # committed in memory on every rank before the pause below
        if rank == 1 and restart < len(pauses) and step + 1 == pauses[restart]:
            with open(os.path.join(out, f"paused-{step + 1}.json"), "w") as f:
                json.dump({"pid": os.getpid(), "memory_dir": os.environ["ELASTIC_MEMORY_DIR"],
                           "node": os.environ["ELASTIC_NODE_ID"]}, f)
            while True:  # until the test's SIGKILL
                signal.pause()
    ckpt.close()
    if rank == 0:
        with open(os.path.join(out, "final.json"), "w") as f:
            json.dump(w.flatten().tolist(), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [int(p) for p in sys.argv[2].split(",")])
