"""The save-at-breakpoint process, kept on standby for the agent's life.

``python -m checkpoint.promote --on-go MEMORY_DIR DURABLE_URL`` imports torch (the checkpoint
package does), which takes seconds, ~10-20 s on a loaded host: too long to start after a
failure. So the agent starts it once, early (once the round's workers completed their first
step: not while they import torch), and asks it for a promotion per failure: a line on its
stdin, one JSON line back, read by the agent's watch loop while the next round runs. EOF on its stdin ends it. One that died or stopped answering
is replaced by the next ask (the launcher imports neither checkpoint nor torch itself).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

# A promotion copies one checkpoint's worth of this node's shards; a stuck filesystem must
# not hold the job's recovery forever.
PROMOTE_TIMEOUT = 600.0


class PromotionStandby:
    """The promotion process over the node's memory `directory` and the job's `durable_url`."""

    def __init__(self, directory: str, durable_url: str) -> None:
        self._cmd = [sys.executable, "-m", "checkpoint.promote", "--on-go", directory, durable_url]
        self._proc: subprocess.Popen | None = None
        self._deadline: float | None = None  # of the promotion asked for (None: none)
        self._timeout = PROMOTE_TIMEOUT
        self._broken: str | None = None  # why the ask could not be written
        self.ensure()

    def ensure(self) -> None:
        """Start the process unless one is running (its imports then overlap other work); one
        that died while asked is replaced by answer()."""
        if (self._proc is None or self._proc.poll() is not None) and not self.asked:
            # stderr is the agent's: a traceback of a crash shows in its log
            self._proc = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def asked(self) -> bool:
        """Whether a promotion was asked for and its answer not yet taken."""
        return self._deadline is not None

    def ask(self, step: int, timeout: float = PROMOTE_TIMEOUT) -> None:
        """Ask for the promotion of `step` without waiting; take the answer with answer()."""
        self.ensure()
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        try:
            self._proc.stdin.write(f"go {step}\n")
            self._proc.stdin.flush()
        except OSError as exc:  # a broken pipe: it died before the ask; answer() says so
            self._broken = f"{type(exc).__name__}: {exc}"

    def answer(self, wait: bool) -> dict | None:
        """The outcome of the promotion asked for: its JSON ({"step": None, "error": ...} if it
        gave none); None while it runs and not `wait`."""
        proc = self._proc
        if self._broken is None:
            left = max(0.0, self._deadline - time.monotonic()) if wait else 0.0
            if not select.select([proc.stdout], [], [], left)[0]:
                if time.monotonic() < self._deadline:
                    return None
                self._kill()
                return self._taken({"step": None, "error": f"no answer from the promotion process in "
                                                           f"{self._timeout:g}s"})
            line = proc.stdout.readline()
        else:
            line = ""
        if not line:
            self._kill()
            why = self._broken or "it exited"
            return self._taken({"step": None, "error": f"the promotion process gave no answer ({why}; "
                                                       f"code {proc.returncode})"})
        try:
            return self._taken(json.loads(line))
        except ValueError:
            return self._taken({"step": None, "error": f"the promotion process answered {line.strip()[:200]!r}"})

    def promote(self, step: int, timeout: float = PROMOTE_TIMEOUT) -> dict:
        """One promotion of `step`, waited for."""
        self.ask(step, timeout)
        return self.answer(wait=True)

    def _taken(self, outcome: dict) -> dict:
        self._deadline = self._broken = None
        return outcome

    def close(self) -> None:
        """Tell the process to exit (EOF); killed if it does not within 10 s."""
        if self._proc is None:
            return
        try:
            self._proc.communicate("", timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
        self._proc = None

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
