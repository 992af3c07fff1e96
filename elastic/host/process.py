"""Process helpers shared by everything that starts children (workers, the private etcd)."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Mapping

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Use as Popen(preexec_fn=...): the kernel SIGKILLs the child when its parent dies.

    The parent is the thread that forked, so children must be started from a thread that
    lives as long as they should (the main thread here).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the parent's own cleanup still stops its children


def spawn_worker(argv: list[str], env: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start a worker process: in a session of its own (a signal to its process group reaches
    anything it started), dying with us (parent-death signal), stdout and stderr piped to us."""
    return subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=die_with_parent, pass_fds=pass_fds,
    )


def kernel_state(pid: int) -> str:
    """What /proc says a process is doing, e.g. "state D (uninterruptible), waiting in
    __refrigerator": the reason a SIGKILLed process is still there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "state unknown"
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except OSError:
        wchan = ""
    described = f"state {state}" + (" (uninterruptible)" if state == "D" else "")
    return described + (f", waiting in {wchan}" if wchan and wchan != "0" else "")
