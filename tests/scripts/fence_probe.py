"""A worker that runs its round fence (it reads etcd with the job's credentials) and records
what a process on the node could see of it.

usage: fence_probe.py OUTDIR
Writes OUTDIR/probe-rank<R>.json: its environment, the argv of itself and of its agent, the
fence's verdict and the mode of the password file it was pointed at.
"""

import json
import os
import stat
import sys

from elastic.exchange import env as names
from elastic.worker.fencing import commit_guard_from_env


def argv_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


outdir = sys.argv[1]
given = dict(os.environ)  # before the fence's etcd client adds its own settings
commit_guard_from_env()()  # raises unless etcd took the credentials and the round is current
password_file = os.environ.get(names.RDZV_PASSWORD_FILE)
record = {
    "env": given,
    "argv": argv_of(os.getpid()) + argv_of(os.getppid()),
    "fence": "ok",
    "password_file_mode": stat.S_IMODE(os.stat(password_file).st_mode) if password_file else None,
}
with open(os.path.join(outdir, f"probe-rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(record, f)
