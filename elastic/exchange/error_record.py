"""The error a worker records before it dies ($ELASTIC_ERROR_FILE, one JSON object).

elastic.launcher.bootstrap writes it for an uncaught exception; the agent (elastic.launcher.worker_group) reads it
to name the failure that ended a round, to tell which rank failed first (by its time), and to
tell a deterministic failure from a fault: an error from the operating system (an errno in
the exception's chain: a full disk, a missing file) is the same error whatever the file,
rank or step it hit. torch.distributed.elastic's @record writes the same file in its own
format; that one is read too (message and time only).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

from elastic.exchange.codec import Record


@dataclass(frozen=True)
class ErrorRecord(Record):
    message: str  # "Type: message" of the exception raised (its last line, if several)
    time: float  # wall clock when it was recorded
    type: str = ""  # what identifies the error: the OSError's type in the chain if any, else the raised one's
    errno: int | None = None  # that OSError's errno
    filename: str | None = None  # the file it was about, when known
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorRecord:
        os_error = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno is not None), None)
        identified = os_error if os_error is not None else exc
        filename = next((str(name) for e in _chain(exc) if (name := _filename(e))), None)
        return cls(message=f"{type(exc).__name__}: {exc}".strip().splitlines()[-1], time=time.time(),
                   type=f"{type(identified).__module__}.{type(identified).__qualname__}",
                   errno=os_error.errno if os_error is not None else None, filename=filename,
                   traceback="".join(traceback.format_exception(exc)))

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def read(cls, path: str) -> ErrorRecord | None:
        """The record at `path`; None when there is none (or it is unreadable: the worker died
        while writing it)."""
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        message = record.get("message")
        if isinstance(message, dict):  # torch.distributed.elastic's @record error file
            when = float(message.get("extraInfo", {}).get("timestamp", 0.0))
            text = str(message.get("message") or "").strip()
            return cls(text.splitlines()[-1], when) if text else None
        try:
            return cls.from_json(record)
        except ValueError:
            return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and the ones it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _filename(exc: BaseException) -> str | None:
    """The file an OSError (filename) or a storage error (path) names."""
    name = getattr(exc, "filename", None) or getattr(exc, "path", None)
    return os.fsdecode(name) if isinstance(name, (str, bytes)) else None
