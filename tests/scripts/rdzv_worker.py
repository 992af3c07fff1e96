"""A worker for rendezvous tests: joins the process group, announces itself, then steps
(all-reduce) until OUTDIR/finish appears, and exits 0.

Writes OUTDIR/round<R>-rank<K>.json with its view (node, world size, ranks, restarts) and
OUTDIR/pid-<node>-round<R>-rank<K> with its pid.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

outdir = sys.argv[1]
dist.init_process_group("gloo")
env = {k: os.environ[k] for k in ("ELASTIC_NODE_ID", "ELASTIC_ROUND", "RANK", "WORLD_SIZE", "GROUP_RANK",
                                  "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")}
name = f"round{env['ELASTIC_ROUND']}-rank{env['RANK']}"
with open(os.path.join(outdir, name + ".tmp"), "w") as f:
    json.dump(env, f)
os.rename(os.path.join(outdir, name + ".tmp"), os.path.join(outdir, name + ".json"))
with open(os.path.join(outdir, f"pid-{env['ELASTIC_NODE_ID']}-{name}"), "w") as f:
    f.write(str(os.getpid()))
finish = os.path.join(outdir, "finish")
while True:
    flag = torch.tensor([1.0 if os.path.exists(finish) else 0.0])
    dist.all_reduce(flag)  # everyone finishes after the same step
    if flag.item() > 0:
        break
    time.sleep(0.05)  # pacing of this stand-in training loop, not synchronisation
dist.destroy_process_group()
