"""A worker that steps like a lock-step training loop and reports its steps (and a checkpoint
commit every 10 steps) the way TrainLoop does, until OUTDIR/finish appears.

usage: paced_worker.py OUTDIR [SLOW_NODE]
On node SLOW_NODE a busy thread competes with the training thread, so its ranks are busy for
the whole step while the others wait for them in the all-reduce (a straggler).

Writes OUTDIR/round<R>-rank<K>.json (its view) and OUTDIR/pid-<node>-round<R>-rank<K>, as
tests/scripts/rdzv_worker.py does (tests/helpers.py's Job reads them).
"""

import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

import elastic
from elastic.worker.context import report_commit, report_progress

outdir = sys.argv[1]
slow_node = sys.argv[2] if len(sys.argv) > 2 else None
ctx = elastic.init()
node = os.environ["ELASTIC_NODE_ID"]
name = f"round{os.environ['ELASTIC_ROUND']}-rank{ctx.rank}"
with open(os.path.join(outdir, name + ".tmp"), "w") as f:
    json.dump({"ELASTIC_NODE_ID": node, "RANK": ctx.rank, "WORLD_SIZE": ctx.world_size}, f)
os.rename(os.path.join(outdir, name + ".tmp"), os.path.join(outdir, name + ".json"))
with open(os.path.join(outdir, f"pid-{node}-{name}"), "w") as f:
    f.write(str(os.getpid()))


def burn() -> None:
    while True:
        sum(range(10_000))


if node == slow_node:
    threading.Thread(target=burn, daemon=True).start()

finish = os.path.join(outdir, "finish")
step = 0
while True:
    flag = torch.tensor([1.0 if os.path.exists(finish) else 0.0])
    dist.all_reduce(flag)  # the step's collective: every rank waits for the slowest
    if flag.item() > 0:
        break
    sum(range(20_000))  # the step's compute (the busy thread slows it on the slow node)
    time.sleep(0.05)  # the rest of a step, not synchronisation
    step += 1
    report_progress(step)
    if step % 10 == 0:
        report_commit(step, 0.01)
dist.destroy_process_group()
