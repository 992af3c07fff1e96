"""The job's events log (JSON lines) and the summary printed when `elastic-run` exits."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from elastic.launcher.goodput import Goodput, GoodputAccount
from elastic.launcher.worker_group import WorkerExit


class EventLog:
    """Append-only JSON lines: one object per event with `time`, `event`, node and run id."""

    def __init__(self, path: str | None, *, run_id: str, node_id: str) -> None:
        self.path = path
        self._goodput = GoodputAccount()  # the summary at exit, kept running: not every event
        self._base = {"run_id": run_id, "node": node_id}
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        # Called with each event as it is logged (the status key, the metrics): quick, no I/O.
        self.listeners: list[Callable[[dict], None]] = []
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def emit(self, event: str, *, at: float | None = None, **fields: object) -> None:
        """Record `event` as of wall-clock time `at` (default: now)."""
        record = {"time": round(time.time() if at is None else at, 3), "event": event, **self._base, **fields}
        with self._lock:
            self._goodput.add(record)
            if self._file is not None:
                self._file.write(json.dumps(record, default=str) + "\n")
                self._file.flush()
        for listener in self.listeners:
            listener(record)

    def goodput(self) -> Goodput:
        """Where this node's time went, from the events so far (elastic/launcher/goodput.py)."""
        with self._lock:
            return self._goodput.result()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RunResult:
    """How the job ended, from this agent's point of view."""

    ok: bool
    reason: str
    restarts: int = 0
    rounds: int = 0
    exits: list[WorkerExit] = field(default_factory=list)
    failures: list[tuple[int, WorkerExit]] = field(default_factory=list)  # (round, exit)
    exit_code: int = 0
    goodput: Goodput | None = None

    def summary(self) -> str:
        """A short table for people: per-rank exits, the failures seen, and the verdict."""
        lines = [f"elastic-run: {'SUCCEEDED' if self.ok else 'FAILED'}: {self.reason}",
                 f"  restarts: {self.restarts}   rounds: {self.rounds}"]
        if self.failures:
            lines.append("  failures:  round  rank  how")
            lines += [f"             {r:>5}  {e.rank:>4}  {e.describe()}" for r, e in self.failures]
        if self.exits:
            lines.append("  last round: rank  local  how")
            lines += [f"              {e.rank:>4}  {e.local_rank:>5}  {e.describe()}" for e in self.exits]
        if self.goodput is not None and self.goodput.steps:
            lines.append(self.goodput.table())
        return "\n".join(lines)
