"""A worker that reports its steps and commits like TrainLoop, whose save on SIGTERM is slow
(a multi-GB commit to object storage).

usage: slow_commit.py OUTDIR COMMIT_SECONDS
Steps every 50 ms (writing its progress record as elastic.worker.context does); after the
first step it writes OUTDIR/ready-rank<R>. On SIGTERM it commits the step it is on, which
takes COMMIT_SECONDS, records the commit and exits 143 as TrainLoop does.
"""

import os
import signal
import sys
import time

from elastic.exchange.progress import Commit, Progress

outdir, commit_seconds = sys.argv[1], float(sys.argv[2])
rank = os.environ["RANK"]
path = os.environ["ELASTIC_PROGRESS_FILE"]
stop = False


def write(record: Progress) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(record.encode() + b"\n")
    os.replace(path + ".tmp", path)


def on_sigterm(signum, frame) -> None:
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_sigterm)
step = 0
while not stop:
    step += 1
    write(Progress(step=step, changed_at=time.time(), resumed=0))
    if step == 1:
        open(os.path.join(outdir, f"ready-rank{rank}"), "w").close()
    time.sleep(0.05)  # a step's compute
time.sleep(commit_seconds)  # the slow commit: the subject of the test
write(Progress(step=step, changed_at=time.time(), resumed=0, commits=(Commit(step, time.time(), 0.0),)))
sys.exit(143)
