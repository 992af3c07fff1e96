"""A plain torchrun-style DDP script: uses only the environment and init_process_group("gloo").

usage: plain_ddp.py OUTDIR [MODE]
MODE: ok (default) - train 5 steps, rank 0 writes OUTDIR/result.json
      hold         - in the first attempt, write OUTDIR/pid-rank<R> and wait to be killed
      fail         - every rank exits with code 3 after init
      hang         - write the pid file and wait forever (in every attempt)
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

outdir, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "ok")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID", "ELASTIC_ROUND"]
with open(os.path.join(outdir, f"env-restart{restart}-rank{rank}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)

if mode == "fail":
    sys.exit(3)
if mode == "hang" or (mode == "hold" and restart == 0):
    with open(os.path.join(outdir, f"pid-rank{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(outdir, f"pid-rank{rank}.tmp"), os.path.join(outdir, f"pid-rank{rank}"))
    while True:
        time.sleep(3600)  # the subject of the test: waits here until it is killed

torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1).double())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    x = torch.arange(8, dtype=torch.float64).reshape(2, 4) / 10 + rank + step
    loss = (model(x) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
if rank == 0:
    params = {n: p.detach().tolist() for n, p in model.module.named_parameters()}
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump({"world": world, "restart": restart, "params": params}, f)
dist.destroy_process_group()
