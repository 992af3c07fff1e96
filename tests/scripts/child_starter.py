"""A worker that starts a child process (`sleep 1237`), as scripts start data loaders or servers.

usage: child_starter.py OUTDIR WHERE THEN
WHERE: group     - the child stays in the worker's process group
       own-group - the child gets a process group of its own (same session), as a shell's job does
THEN:  wait      - the worker waits to be killed
       exit      - the worker exits 0 at once, leaving its child running
Writes OUTDIR/child-rank<R> (the child's pid), then OUTDIR/ready-rank<R>.
"""

import os
import subprocess
import sys
import time

outdir, where, then = sys.argv[1:4]
rank = os.environ["RANK"]
child = subprocess.Popen(["sleep", "1237"], process_group=0 if where == "own-group" else None)
with open(os.path.join(outdir, f"child-rank{rank}"), "w") as f:
    f.write(str(child.pid))
open(os.path.join(outdir, f"ready-rank{rank}"), "w").close()
if then == "exit":
    os._exit(0)  # leave the child behind, as a script that forgot it would
while True:
    time.sleep(3600)  # the subject of the test: waits here until it is killed
