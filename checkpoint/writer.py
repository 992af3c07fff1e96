"""The async half of a save: reusable staging memory and one background job at a time.

`StagingBuffer` is one uint8 CPU buffer reused by every save; it only grows (when the state
grows), so host memory is steady across saves. `BackgroundJob` runs at most one job in a
thread: submitting a second job first waits for the first (backpressure, never a queue), and
an exception raised by a job is re-raised by the next call to `submit()` or `wait()`.
The thread is not a daemon: an interpreter that exits normally finishes the pending write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


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
