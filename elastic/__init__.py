"""Elastic, fault-tolerant training runtime for PyTorch."""

from elastic.errors import (
    ConfigError as ConfigError,
    ElasticError as ElasticError,
    RendezvousConnectionError as RendezvousConnectionError,
    RendezvousError as RendezvousError,
    RendezvousTimeoutError as RendezvousTimeoutError,
    StaleRoundError as StaleRoundError,
)
