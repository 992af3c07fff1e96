"""A one-line progress bar on a terminal, for long reads (`elastic-ckpt verify`)."""

from __future__ import annotations

from typing import TextIO

from checkpoint.cli.tables import WIDTH, size

# Below this a checkpoint verifies in about a second: no bar.
LARGE_BYTES = 256 << 20


def wanted(stream: TextIO, total: int, mode: str) -> bool:
    """mode "auto": a bar on a TTY for large reads; "always" / "never" force it."""
    if mode == "auto":
        return stream.isatty() and total >= LARGE_BYTES
    return mode == "always"


class ProgressBar:
    """Redraws `label [#####.....]  42%  1.0 MiB/2.4 MiB` in place with a carriage return."""

    def __init__(self, stream: TextIO, total: int, label: str) -> None:
        self._stream, self._total, self._label = stream, max(total, 1), label
        self._done = 0
        self._shown = -1

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        percent = min(100, self._done * 100 // self._total)
        if percent != self._shown:
            self._shown = percent
            self._draw(percent)

    def _draw(self, percent: int) -> None:
        tail = f" {percent:3d}%  {size(self._done)}/{size(self._total)}"
        room = WIDTH - 1 - len(self._label) - len(tail) - 3
        filled = room * percent // 100
        self._stream.write(f"\r{self._label} [{'#' * filled}{'.' * (room - filled)}]{tail}")
        self._stream.flush()

    def close(self) -> None:
        """Erase the bar so the lines that follow start clean."""
        if self._shown >= 0:
            self._stream.write("\r" + " " * (WIDTH - 1) + "\r")
            self._stream.flush()
