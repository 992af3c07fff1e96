"""The progress record: what a rank's training loop tells its agent, one JSON line in a file.

A worker that uses `elastic.TrainLoop` (or calls `elastic.worker.context.report_progress`) creates
its progress file at `elastic.init()` and rewrites it after every optimizer step (and, from
the checkpoint writer thread, after each checkpoint commit). The agent reads it to judge hangs
(elastic/launcher/hang_watch.py), to log commits, and to see a worker park for an in-process
reconfiguration. Torch-free: both sides import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.exchange.codec import Record


@dataclass(frozen=True)
class Commit(Record):
    """A checkpoint commit as one rank saw it."""

    step: int
    at: float  # wall-clock time of the commit
    stall: float  # seconds the save held this rank's training thread
    tier: str = "durable"  # durable (--checkpoint-dir) or memory (the node's memory tier)


@dataclass(frozen=True)
class Progress(Record):
    """What one rank's progress file says: one JSON line, written by elastic.worker.context."""

    step: int | None  # last completed optimizer step; None before the first report
    # Wall-clock time `step` was reported (before that: the file's creation), for the events
    # log; hang detection never compares it with another process's clock (hang_watch.py).
    changed_at: float
    resumed: int | None = None  # the first step this process reported (where TrainLoop resumed)
    commits: tuple[Commit, ...] = ()  # the newest KEPT_COMMITS checkpoint commits this rank saw
    reconfigurable: bool = False  # its TrainLoop can re-form the process group in-process
    parked: int | None = None  # committed this step and waits for its next round (elastic/exchange/control.py)
    restored_tier: str | None = None  # where TrainLoop's resume read its checkpoint: durable or memory
    restored_peer_bytes: int = 0  # of which bytes came from other nodes' memory
    skipped_steps: int = 0  # steps the loop's grad scaler skipped (inf/NaN gradients) in the run so far

    # Commits kept in the record: the agent reads it every --monitor-interval, and several
    # commits can come in between (a final save right after a periodic one).
    KEPT_COMMITS = 8

    def encode(self) -> bytes:
        return self.to_json().encode()


def read_progress(path: str) -> Progress | None:
    """None when the rank does not report progress (no file); ValueError when the record
    was caught half rewritten."""
    try:
        with open(path, "rb") as f:
            return Progress.from_json(f.read())
    except FileNotFoundError:
        return None
