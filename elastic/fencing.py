"""Round fencing for workers: refuse a commit made by a worker of a stale round.

`commit_guard_from_env()` returns a callable that raises StaleRoundError when the
rendezvous has moved past the round this worker was started in, or None when the worker
does not run under `elastic-run` (plain torchrun or a single process: nothing to fence).
"""

from __future__ import annotations

from collections.abc import Callable


def commit_guard_from_env() -> Callable[[], None] | None:
    # Filled in with the rendezvous protocol; until then there is nothing to fence against.
    return None
