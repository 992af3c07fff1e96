"""The rules that judge failures: which ones are faults that say nothing about the code
(transient errors, a peer's death), when one repeats (a deterministic failure: not retried),
what the job's final reason then says to do, and how long a crash loop backs off.

Pure rules over what the agent saw; elastic/launcher/recovery.py applies them.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from elastic.exchange.error_record import ErrorRecord

# Random tokens that differ between two runs of the same bug: temp/shard file suffixes,
# uuids, addresses (e.g. "rank00001-3f9c2a1b7d4e.safetensors", "0x7f3a9c...").
_VOLATILE = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b")

# Errors of the network or of a busy peer: a retry may well succeed.
_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EINTR,
    errno.ENOBUFS,
})
# The same errors raised without an errno (`raise TimeoutError("...")`).
_TRANSIENT_TYPES = frozenset(f"builtins.{name}" for name in (
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "BlockingIOError", "InterruptedError"))
# An object store asking clients to slow down or to come back later (S3, GCS, Azure).
_THROTTLED = re.compile(r"\(SlowDown\)|reduce your request rate|throttl|too many requests|rate ?limit|"
                        r"requestlimitexceeded|server ?busy|service ?unavailable|backend ?error|"
                        r"\bInternalError\b|bad gateway|gateway timeout", re.IGNORECASE)
# What a rank raises when a peer died under a collective (gloo, NCCL, the TCPStore): the
# cause is elsewhere (that peer's own error, a kill, a lost node).
_PEER_DIED = re.compile(r"(?:connection|closed|reset) by peer|connection refused|broken pipe|"
                        r"remote process exited|communicator was aborted|watchdog caught collective|"
                        r"timed out waiting [^\n]* for (?:recv|send)|socket timeout|failed to recv|"
                        r"^(?:DistNetworkError|DistStoreError)\b", re.IGNORECASE)


def fault_kind(error: ErrorRecord) -> str | None:
    """Why this error is a fault rather than a bug ("a transient ECONNRESET", "object-store
    throttling", "a peer's death"), so that it never counts as a deterministic failure;
    None when it may be the code's own."""
    if error.errno in _TRANSIENT_ERRNOS:
        return f"a transient {errno.errorcode[error.errno]}"
    if error.type in _TRANSIENT_TYPES:
        return f"a transient {error.type.removeprefix('builtins.')}"
    if _THROTTLED.search(error.message):
        return "object-store throttling"
    if _PEER_DIED.search(error.message):
        return "a peer's death"
    return None


def failure_signature(error: ErrorRecord | None, detail: str, step: int | None,
                      committed: int | None) -> tuple | None:
    """What must be equal for failures in a row to count as one deterministic failure; None
    when this one cannot be judged (no step reported, no error from the system) or is a
    fault (fault_kind: a transient error, throttling, a peer's death).

    - An error from the operating system (an errno in the exception's chain: a full disk,
      a missing file, permissions) is the same error whatever file, rank or step hit it
      first: the same type and errno, while the job made no progress in between (the
      newest committed checkpoint, `committed`, where a restart resumes, is the same).
    - Any other error, or a hang (`detail`): the same message with random tokens blanked,
      and without the rank (whichever rank raised first), at the same step.
    """
    if error is not None and fault_kind(error) is not None:
        return None
    if error is not None and error.errno is not None:
        return ("os error", error.type, error.errno, committed)
    if step is None:
        return None
    return ("message", _VOLATILE.sub("#", error.message if error is not None else detail), step)


def deterministic_reason(detail: str, step: int | None, error: ErrorRecord | None,
                         checkpoint_dir: str | None, limit: int) -> str:
    """Why the job stops at a failure that repeated `limit` times in a row (see
    failure_signature): which rule stopped it, and what to do."""
    rule = f"the same-failure rule stopped the job ({limit} identical failures in a row; --same-failure-limit)"
    if error is None or error.errno is None:
        return f"{detail} again at step {step}; {rule}: not retrying a deterministic failure"
    code = errno.errorcode.get(error.errno, str(error.errno))
    again = f"{detail} again, with no newer checkpoint to resume from"
    if error.errno != errno.ENOSPC:
        return f"{again} ({code}: {os.strerror(error.errno)}); {rule}: not retrying a deterministic failure"
    if checkpoint_dir and error.filename and _inside(error.filename, checkpoint_dir):
        return (f"{again}: the checkpoint directory's filesystem is full (ENOSPC); {rule}: not retrying a "
                f"deterministic failure: free space or point --checkpoint-dir elsewhere")
    where = f"the filesystem of {error.filename}" if error.filename else "a filesystem"
    return f"{again}: {where} is full (ENOSPC); {rule}: not retrying a deterministic failure: free space there"


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass
class FailureHistory:
    """This node's failures so far, as far as the rules need them."""

    limit: int = 3  # identical failures in a row that stop the job (--same-failure-limit; 0: never)
    last: tuple | None = None  # failure_signature of the last failure
    count: int = 0  # failures in a row with that signature
    stalled: int = 0  # failures in a row of rounds that completed no step

    def repeated(self, signature: tuple | None, *, killed: bool) -> bool:
        """Whether this failure (`killed`: a rank died of a signal, raising nothing) makes
        `limit` identical failures in a row; remembers it for the next."""
        # Only an exception or a hang can repeat deterministically; a rank killed by a signal
        # (SIGKILL from outside, the OOM killer, a lost node) says nothing about the code, and
        # neither does a fault (signature None): either one ends the streak.
        if signature is None or killed:
            self.last, self.count = None, 0
            return False
        self.count = self.count + 1 if signature == self.last else 1
        self.last = signature
        return 0 < self.limit <= self.count

    def back_off(self, step_done: bool) -> float:
        """Seconds to wait before restarting after this failure (`step_done`: its round
        completed a step). After `stalled` failed rounds in a row that completed no step:
        the first restart is immediate; repeated ones wait 0.5, 1, 2 ... up to 30 s."""
        # Back off only in a crash loop: a round that completed a step since it resumed
        # proves the restart worked, so the next fault is again restarted at once.
        self.stalled = 1 if step_done else self.stalled + 1
        return 0.0 if self.stalled <= 1 else min(30.0, 0.5 * 2 ** (self.stalled - 2))
