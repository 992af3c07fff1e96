"""A TrainLoop in a script that never calls elastic.init(): it starts its process group itself,
as a torchrun script does. Run under elastic-run: 10 steps, a checkpoint every 5.

Usage: loop_without_init.py CKPT_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import elastic
from checkpoint import CheckpointManager


def main(ckpt_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    data = [(torch.randn(4), torch.randn(1)) for _ in range(64)]
    ckpt = CheckpointManager(ckpt_dir)
    loop = elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=data,
                             global_batch_size=8, micro_batch_size=4, max_steps=10, checkpoint=ckpt, save_every=5)
    loop.resume()
    for step in loop:
        for x, y in step:
            step.backward(torch.nn.functional.mse_loss(model(x), y))
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
