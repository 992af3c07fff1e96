"""A worker that reports its steps like TrainLoop does, and misbehaves on cue.

usage: progress_worker.py OUTDIR MODE STEP [STEPS]
MODE: spin   - in the first attempt, rank 1 spins forever (holding the GIL) at STEP
      raise  - rank 1 raises RuntimeError at STEP in every attempt (a deterministic bug)
      reset  - rank 1 raises ConnectionResetError (errno 104) at STEP in every attempt (a flaky network)
      ok     - just runs STEPS steps
"""

import errno
import os
import sys
import time

import torch
import torch.distributed as dist

import elastic
from elastic.worker.context import report_progress

outdir, mode, bad_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
ctx = elastic.init()


def spin_holding_the_gil() -> None:
    while True:
        pass


for step in range(1, steps + 1):
    if ctx.rank == 1 and step == bad_step:
        if mode == "spin" and ctx.restart_count == 0:
            spin_holding_the_gil()
        if mode == "raise":
            raise RuntimeError(f"boom at step {step}")
        if mode == "reset":
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(0.05)  # a step's compute: lets the agent see steps go by (goodput accounting)
    report_progress(step)
open(os.path.join(outdir, f"done-rank{ctx.rank}-restart{ctx.restart_count}"), "w").close()
