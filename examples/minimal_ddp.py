"""Minimal elastic DDP job. Run: elastic-run --standalone --nproc-per-node 2 examples/minimal_ddp.py
Learns the next byte of Python's own json module source from the 8 bytes before it."""
import inspect
import json

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import elastic
from checkpoint import CheckpointManager

ctx = elastic.init()
data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
ctx_len = 8
dataset = [(data[i : i + ctx_len], data[i + ctx_len]) for i in range(0, len(data) - ctx_len, 3)]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Flatten(), torch.nn.Linear(16 * ctx_len, 256))
if ctx.world_size > 1:
    model = DDP(model)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
ckpt = CheckpointManager(ctx.checkpoint_dir, keep_last=2)  # --checkpoint-dir, or ./checkpoints/<run id>
loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=dataset, global_batch_size=64,
                         micro_batch_size=16, checkpoint=ckpt, save_every=50, max_steps=200, seed=0)
for step in loop:
    total = 0.0
    for x, y in step:
        loss = F.cross_entropy(model(x), y)
        step.backward(loss)
        total += loss.item() * step.micro_batch.size
    if step.index % 50 == 0 and ctx.rank == 0:
        print(f"step {step.index} epoch {step.epoch} world {step.world_size} "
              f"accumulation {step.accumulation_steps} loss {total / max(1, len(step.sample_ids)):.3f}")
ckpt.close()
if ctx.rank == 0:
    print(f"done at step {loop.step}")
