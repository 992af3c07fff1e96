"""Elastic, fault-tolerant training runtime for PyTorch.

The worker-side names (`init`, `TrainLoop`, ...) import torch, which takes seconds; they are
loaded on first use so that `elastic-run` (which never needs torch) starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from elastic.errors import (
    ConfigError as ConfigError,
    ElasticError as ElasticError,
    RendezvousConnectionError as RendezvousConnectionError,
    RendezvousError as RendezvousError,
    RendezvousTimeoutError as RendezvousTimeoutError,
    StaleRoundError as StaleRoundError,
    StateMismatchError as StateMismatchError,
    TrainLoopUsageError as TrainLoopUsageError,
)

if TYPE_CHECKING:
    from elastic.worker.context import Context as Context, init as init
    from elastic.worker.batches import sample_generator as sample_generator
    from elastic.worker.sampler import ElasticSampler as ElasticSampler
    from elastic.worker.train_loop import Step as Step, TrainLoop as TrainLoop

_LAZY = {"Context": "elastic.worker.context", "init": "elastic.worker.context", "ElasticSampler": "elastic.worker.sampler",
         "Step": "elastic.worker.train_loop", "TrainLoop": "elastic.worker.train_loop",
         "sample_generator": "elastic.worker.batches"}

__all__ = sorted([*_LAZY, "ConfigError", "ElasticError", "RendezvousConnectionError", "RendezvousError",
                  "RendezvousTimeoutError", "StaleRoundError", "StateMismatchError", "TrainLoopUsageError"])


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'elastic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})  # the lazy names too, before their first use
