"""A worker for the static rendezvous across two nodes: rank 1 dies (exit 3) in the first
attempt, so rank 0's all-reduce fails and both nodes restart their groups; in the second
attempt the all-reduce succeeds. Writes OUTDIR/restart<R>-rank<K>.json with what it saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

outdir = sys.argv[1]
dist.init_process_group("gloo")
rank, restart = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if rank == 1 and restart == 0:
    sys.exit(3)
total = torch.ones(1)
dist.all_reduce(total)  # fails on rank 0 in the first attempt: its peer is gone
with open(os.path.join(outdir, f"restart{restart}-rank{rank}.json"), "w") as f:
    json.dump({"world": dist.get_world_size(), "sum": total.item(), "port": os.environ["MASTER_PORT"]}, f)
dist.destroy_process_group()
