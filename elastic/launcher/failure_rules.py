"""The rules that judge failures: when one repeats (a deterministic failure: not retried),
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


def failure_signature(error: ErrorRecord | None, detail: str, step: int | None,
                      committed: int | None) -> tuple | None:
    """What must be equal for two failures in a row to count as one deterministic failure;
    None when this one cannot be judged (no step reported, no error from the system).

    - An error from the operating system (an errno in the exception's chain: a full disk,
      a missing file, permissions) is the same error whatever file, rank or step hit it
      first: the same type and errno, while the job made no progress in between (the
      newest committed checkpoint, `committed`, where a restart resumes, is the same).
    - Any other error, or a hang (`detail`): the same message with random tokens blanked,
      and without the rank (whichever rank raised first), at the same step.
    """
    if error is not None and error.errno is not None:
        return ("os error", error.type, error.errno, committed)
    if step is None:
        return None
    return ("message", _VOLATILE.sub("#", error.message if error is not None else detail), step)


def deterministic_reason(detail: str, step: int | None, error: ErrorRecord | None,
                         checkpoint_dir: str | None) -> str:
    """Why the job stops at a failure that repeated (see failure_signature), and what to do."""
    if error is None or error.errno is None:
        return f"{detail} again at step {step}; not retrying a deterministic failure"
    code = errno.errorcode.get(error.errno, str(error.errno))
    again = f"{detail} again, with no newer checkpoint to resume from"
    if error.errno != errno.ENOSPC:
        return f"{again} ({code}: {os.strerror(error.errno)}); not retrying a deterministic failure"
    if checkpoint_dir and error.filename and _inside(error.filename, checkpoint_dir):
        return (f"{again}: the checkpoint directory's filesystem is full (ENOSPC); not retrying a "
                f"deterministic failure: free space or point --checkpoint-dir elsewhere")
    where = f"the filesystem of {error.filename}" if error.filename else "a filesystem"
    return f"{again}: {where} is full (ENOSPC); not retrying a deterministic failure: free space there"


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass
class FailureHistory:
    """This node's failures so far, as far as the rules need them."""

    last: tuple | None = None  # failure_signature of the last failure
    stalled: int = 0  # failures in a row of rounds that completed no step

    def repeated(self, signature: tuple | None, *, killed: bool) -> bool:
        """Whether this failure (`killed`: a rank died of a signal, raising nothing) is the
        last one again; remembers it for the next."""
        # Only an exception or a hang can repeat deterministically; a rank killed by a signal
        # (SIGKILL from outside, the OOM killer, a lost node) says nothing about the code.
        again = signature is not None and not killed and signature == self.last
        self.last = signature
        return again

    def back_off(self, step_done: bool) -> float:
        """Seconds to wait before restarting after this failure (`step_done`: its round
        completed a step). After `stalled` failed rounds in a row that completed no step:
        the first restart is immediate; repeated ones wait 0.5, 1, 2 ... up to 30 s."""
        # Back off only in a crash loop: a round that completed a step since it resumed
        # proves the restart worked, so the next fault is again restarted at once.
        self.stalled = 1 if step_done else self.stalled + 1
        return 0.0 if self.stalled <= 1 else min(30.0, 0.5 * 2 ** (self.stalled - 2))
