"""Spare worker processes started ahead of time, torch already imported, for fast restarts.

A Python worker spends seconds before its script's first line: the interpreter, then torch
(about 3 s of the 4 s a restart took here). The agent keeps `size` processes that ran
`python -m elastic.launcher.bootstrap --warm FD`, imported torch (bootstrap.WARM_IMPORTS), said so
with one byte on socket FD and wait there for their assignment. A round hands each of its ranks to one of them: the worker's
full environment, its argv and working directory, as JSON; the process takes them on and runs
the script exactly as a cold worker would (elastic/launcher/bootstrap.py). A process that is still
importing can be handed a rank too: it starts the script as soon as its imports are done.

Spares are started like workers (elastic/host/process.py: own session, parent-death signal,
stdout/stderr pipes that the worker group reads once the process is a rank), so an idle one
never outlives the agent either. Their environment is the part of a worker's environment that
is the same for every rank and round, so variables read at import time (OMP_NUM_THREADS) are
right from the start; the rank's variables arrive with the assignment. `fill()` must run on
the thread that lives as long as the spares (the parent-death signal follows that thread):
the agent's main thread, once a round's first step is done, so that the spares' imports do
not compete with the round's start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from elastic.host.process import spawn_worker
from elastic.launcher.bootstrap import WARM_FLAG, boot_command


@dataclass
class _Spare:
    proc: subprocess.Popen
    channel: socket.socket  # our end of the socket pair: "ready" comes in, the assignment goes out
    ready: bool = False


class WarmPool:
    """Up to `size` spare Python workers waiting for an assignment."""

    def __init__(self, size: int, env: Mapping[str, str]) -> None:
        self._size = size
        self._env = dict(env)
        self._spares: list[_Spare] = []

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._spares]

    @property
    def full(self) -> bool:
        return len(self._spares) >= self._size

    def newly_ready(self) -> bool:
        """True once, when every spare has finished its imports (non-blocking)."""
        if not self._spares or all(s.ready for s in self._spares):
            return False
        for spare in self._spares:
            if not spare.ready:
                try:
                    spare.ready = bool(spare.channel.recv(1, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    return False
        return all(s.ready for s in self._spares)

    def fill(self) -> None:
        """Start spares until `size` wait (from the main thread: see the module doc)."""
        while not self.full:
            self._spares.append(self._start())

    def _start(self) -> _Spare:
        ours, theirs = socket.socketpair()
        try:
            proc = spawn_worker(boot_command(WARM_FLAG, str(theirs.fileno())), self._env,
                                pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Spare(proc, ours)

    def launch(self, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        """Run `python -m elastic.launcher.bootstrap ARGV` with `env` in a spare (the oldest one
        alive; a new one if none is left) and return its process."""
        assignment = json.dumps({"argv": argv, "env": dict(env), "cwd": os.getcwd()}).encode()
        while self._spares:
            spare = self._spares.pop(0)
            if _hand_over(spare, assignment):
                return spare.proc
            _discard(spare)  # it died while idle
        spare = self._start()
        _hand_over(spare, assignment)  # if it failed, the new process died: a worker failure
        return spare.proc

    def close(self) -> None:
        """Stop every spare (idle ones only hold their imports: nothing to save)."""
        for spare in self._spares:
            spare.channel.close()
            if spare.proc.poll() is None:
                try:
                    os.killpg(spare.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # exited between poll() and killpg()
            _discard(spare)
        self._spares = []


def _hand_over(spare: _Spare, assignment: bytes) -> bool:
    """Send the assignment and close our end; False if the spare is dead."""
    try:
        if spare.proc.poll() is not None:
            return False
        spare.channel.sendall(assignment)
        return True
    except OSError:
        return False  # it died while we wrote
    finally:
        spare.channel.close()


def _discard(spare: _Spare) -> None:
    spare.proc.wait()
    for stream in (spare.proc.stdout, spare.proc.stderr):
        if stream is not None:
            stream.close()
