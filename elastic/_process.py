"""Process helpers shared by everything that starts children (workers, the private etcd)."""

from __future__ import annotations

import ctypes
import signal

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
