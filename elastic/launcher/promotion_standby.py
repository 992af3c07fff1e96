"""The save-at-breakpoint process, kept on standby for the agent's life.

``python -m checkpoint.promote --on-go MEMORY_DIR DURABLE_URL`` imports torch (the checkpoint
package does), which takes seconds, ~10-20 s on a loaded host: too long to start after a
failure, while the job waits. So the agent starts it once, early (it imports while the
rendezvous runs and the workers start), and asks it for a promotion per failure: a line on
its stdin, one JSON line back. EOF on its stdin ends it. One that died or stopped answering
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
        self.ensure()

    def ensure(self) -> None:
        """Start the process unless one is running (its imports then overlap other work)."""
        if self._proc is None or self._proc.poll() is not None:
            # stderr is the agent's: a traceback of a crash shows in its log
            self._proc = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def promote(self, timeout: float = PROMOTE_TIMEOUT) -> dict:
        """One promotion: the process's JSON outcome ({"step": None, "error": ...} if it gave none)."""
        self.ensure()
        proc = self._proc
        deadline = time.monotonic() + timeout
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            while not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if time.monotonic() >= deadline:
                    self._kill()
                    return {"step": None, "error": f"no answer from the promotion process in {timeout:g}s"}
            line = proc.stdout.readline()
        except OSError as exc:  # a broken pipe: it died before the ask
            line, why = "", f"{type(exc).__name__}: {exc}"
        else:
            why = "it exited"
        if not line:
            self._kill()
            return {"step": None, "error": f"the promotion process gave no answer ({why}; code {proc.returncode})"}
        try:
            return json.loads(line)
        except ValueError:
            return {"step": None, "error": f"the promotion process answered {line.strip()[:200]!r}"}

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
