"""The async half of a save: reusable staging memory, the snapshot copy, one background job.

`StagingBuffer` is one uint8 CPU buffer reused by every save; it only grows (when the state
grows), so host memory is steady across saves. `BackgroundJob` runs at most one job in a
thread: submitting a second job first waits for the first (backpressure, never a queue), and
an exception raised by a job is re-raised by the next call to `submit()` or `wait()`.
The thread is not a daemon: an interpreter that exits normally finishes the pending write.
`Snapshot` copies the blocks into staging in file order and lets the writer (and the
optimizer hook of the overlap mode) wait for a prefix of them, so writing starts as soon as
the first block is staged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from checkpoint.errors import CheckpointError


class StagingBuffer:
    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # drop the old one first: peak memory is one buffer, not two
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self._buffer

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()


class BackgroundJob:
    """At most one job in flight; its error surfaces on the next submit() or wait()."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=self._name)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # handed to the caller's thread by wait(); never dropped
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Snapshot:
    """Progress of copying `count` blocks into staging; other threads wait for a prefix."""

    def __init__(self, count: int, *, what: str) -> None:
        self._count = count
        self._what = what
        self._staged = 0
        self._error: Exception | None = None
        self._cond = threading.Condition()

    def run(self, copy_block: Callable[[int], None]) -> None:
        try:
            for index in range(self._count):
                copy_block(index)
                with self._cond:
                    self._staged = index + 1
                    self._cond.notify_all()
        except Exception as exc:  # waiters raise it too (wait_for); the caller sees it here
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            raise

    def wait_for(self, blocks: int) -> int:
        """Block until at least `blocks` are staged; return how many are. Raise if the copy failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._staged >= blocks or self._error is not None)
            if self._staged < blocks:
                raise CheckpointError(f"{self._what} failed: {self._error!r}") from self._error
            return self._staged

    def wait(self) -> None:
        self.wait_for(self._count)
