"""The error tree of the checkpoint manager. Callers choose what to do by type, never by text."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base of every error raised by the checkpoint manager."""


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint (or its manifest) does not exist or is not committed."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint is unreadable: bad manifest, missing or truncated file, checksum mismatch."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the state it is loaded into (missing/unexpected keys, shapes, dtypes)."""


class StorageError(CheckpointError):
    """The storage backend failed (write, fsync, rename, list, delete); the cause is in __cause__."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path  # what it failed on, when it was one file or directory
