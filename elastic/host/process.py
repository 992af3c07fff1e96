"""Process helpers shared by everything that starts children (workers, the private etcd)."""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping

_PR_SET_PDEATHSIG = 1

# Resolved here, at import, in the agent: the preexec hook runs in a child forked from a
# threaded process (gRPC, watch and keep-alive threads), where loading a library could take
# a lock another thread held at the fork and never released in the child.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies; exit at once if the
    parent, `parent`, is already gone (it died before the request: no signal would come).

    The parent is the thread that forked, so children must be started from a thread that
    lives as long as they should (the main thread here).
    """
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def parent_death_hook() -> Callable[[], None]:
    """A Popen(preexec_fn=...) made in the parent: the child dies with this process."""
    return functools.partial(die_with_parent, os.getpid())


def spawn_worker(argv: list[str], env: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start a worker process: in a session of its own (everything it starts can be found and
    killed with it: see kill_sessions), dying with us (parent-death signal), stdout and stderr
    piped to us."""
    return subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=parent_death_hook(), pass_fds=pass_fds,
    )


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _session(pid: int) -> int | None:
    """The session of a live (not zombie) process."""
    fields = _stat(pid)
    return int(fields[3]) if fields and fields[0] != "Z" else None


def session_members(sids: Iterable[int]) -> dict[int, int]:
    """pid -> session, for every live process in one of the sessions `sids`."""
    wanted = set(sids)
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (sid := _session(int(entry))) in wanted:
            found[int(entry)] = sid
    return found


def kill_sessions(sids: Iterable[int], timeout: float) -> dict[int, int]:
    """SIGKILL every process of the sessions `sids` (a worker's: it leads one) and wait up to
    `timeout` seconds for them to die. Returns pid -> session of those still alive (stuck in
    the kernel, D state); an empty dict when all died.

    Sessions are scanned again until a scan finds nobody new (a process forked between a scan
    and its parent's death). Each process is signalled through a pidfd opened before its
    session is checked again, so a pid reused by an unrelated process is never signalled. A
    process that started a session of its own (a daemon: setsid) has left and is not found.
    """
    sids = set(sids)
    deadline = time.monotonic() + timeout
    stuck: dict[int, int] = {}
    while fresh := {pid: sid for pid, sid in session_members(sids).items() if pid not in stuck}:
        stuck.update(_kill_and_wait(fresh, deadline))
    return stuck


def _kill_and_wait(targets: dict[int, int], deadline: float) -> dict[int, int]:
    """SIGKILL `targets` (pid -> session), wait for them until `deadline`; those still alive."""
    waiting: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, session)
    try:
        for pid, sid in targets.items():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if _session(pid) != sid:  # gone, a zombie, or the pid names another process now
                os.close(fd)
                continue
            waiting[fd] = (pid, sid)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited since the check: its pidfd is readable already
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)  # readable once the process has exited
        left = dict(waiting)
        while left and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                left.pop(fd)
        return {pid: sid for pid, sid in left.values() if _session(pid) == sid}
    finally:
        for fd in waiting:
            os.close(fd)


def kernel_state(pid: int) -> str:
    """What /proc says a process is doing, e.g. "state D (uninterruptible), waiting in
    __refrigerator": the reason a SIGKILLed process is still there."""
    fields = _stat(pid)
    if not fields:
        return "state unknown"
    state = fields[0]
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except OSError:
        wchan = ""
    described = f"state {state}" + (" (uninterruptible)" if state == "D" else "")
    return described + (f", waiting in {wchan}" if wchan and wchan != "0" else "")
