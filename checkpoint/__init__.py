"""Checkpoint management: sharded safetensors on any fsspec filesystem."""

from checkpoint.errors import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
    CheckpointNotFoundError as CheckpointNotFoundError,
    StorageError as StorageError,
)
from checkpoint.manager import CheckpointManager as CheckpointManager
from checkpoint.format.statedict import PerRank as PerRank

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "PerRank",
    "StorageError",
]
