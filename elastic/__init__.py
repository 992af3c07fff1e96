"""Elastic, fault-tolerant training runtime for PyTorch."""

from elastic.context import Context as Context, init as init
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
from elastic.sampler import ElasticSampler as ElasticSampler
from elastic.train_loop import Step as Step, TrainLoop as TrainLoop
