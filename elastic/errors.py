"""The error tree of the elastic runtime. Callers choose what to do by type, never by text."""

from __future__ import annotations


class ElasticError(Exception):
    """Base of every error raised by the elastic runtime."""


class ConfigError(ElasticError):
    """A flag, environment variable or option has a value we cannot use."""


class EtcdServerError(ElasticError):
    """The private etcd server could not be found or started."""


class RendezvousError(ElasticError):
    """Base of the rendezvous errors."""


class RendezvousConnectionError(RendezvousError):
    """etcd could not be reached (after the allowed retries)."""


class RendezvousTimeoutError(RendezvousError):
    """Not enough nodes joined in time."""


class RendezvousClosedError(RendezvousError):
    """The job was closed (finished or failed) by some agent; do not join again."""

    def __init__(self, reason: str, *, ok: bool = False) -> None:
        super().__init__(reason)
        self.ok = ok  # the job succeeded (a spare that was never needed ends with it)


class RendezvousStateError(RendezvousError):
    """The state found in etcd is unreadable or contradicts the protocol."""


class StaleRoundError(RendezvousError):
    """An action was fenced off because a newer rendezvous round exists."""


class TrainLoopUsageError(ElasticError):
    """The training loop was driven in a way that cannot give the promised gradient."""


class StateMismatchError(ElasticError):
    """A checkpoint was written by a loop with another sample order (batch size, dataset, seed)."""
