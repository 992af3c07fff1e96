"""clip_grad_norm under FSDP2 against DDP, in one 2-rank gloo group (tests/test_optimizer_step.py).

usage: clip_worker.py OUT.pt MAX_NORM
Run under a torchrun-style environment. Each variant (DDP, then FSDP2's fully_shard) trains
loop_worker.py's float64 model on its data set for STEPS steps with
TrainLoop(clip_grad_norm=MAX_NORM); rank 0 saves {variant: {"ids", "norms", "clipped",
"params"}}: each step's global sample ids, its norm before clipping (step.grad_norm), the
gradients the optimizer stepped with, and the final parameters, as full plain tensors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elastic
from loop_worker import build_dataset, build_model

STEPS = 3


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for an FSDP2 shard)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(wrap: Callable[[torch.nn.Module], torch.nn.Module], max_norm: float) -> dict:
    model = wrap(build_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clipped = []
    optimizer.register_step_pre_hook(lambda *_: clipped.append([full(p.grad) for p in model.parameters()]))
    loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=build_dataset(), global_batch_size=7,
                             micro_batch_size=2, max_steps=STEPS, seed=5, clip_grad_norm=max_norm)
    steps = []
    for step in loop:
        for x, y, _ in step:
            step.backward(F.mse_loss(model(x), y))
        steps.append(step)
    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # FSDP2's norm is a replicated DTensor (torch's clip_grad_norm_ returns one): saved as a plain tensor.
    return {"ids": [s.global_sample_ids for s in steps], "norms": [full(s.grad_norm) for s in steps],
            "clipped": clipped, "params": params}


def main() -> None:
    ctx = elastic.init()
    max_norm = float(sys.argv[2])
    results = {"ddp": train(DistributedDataParallel, max_norm), "fsdp2": train(fully_shard, max_norm)}
    if ctx.rank == 0:
        torch.save(results, sys.argv[1])


if __name__ == "__main__":
    main()
