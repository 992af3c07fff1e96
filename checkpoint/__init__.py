"""Checkpoint management: sharded safetensors on any fsspec filesystem."""

from checkpoint.errors import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
    CheckpointNotFoundError as CheckpointNotFoundError,
    StorageError as StorageError,
)
from checkpoint.manager import CheckpointManager as CheckpointManager

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "StorageError",
]
