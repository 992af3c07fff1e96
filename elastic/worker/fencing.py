"""Round fencing for workers: refuse a commit made by a worker of a stale round.

A worker started for round r may commit (a checkpoint, a result) only while r is still the
newest sealed round. After a planned change (growth, a node leaving) the round number moves
on at once, but the next round is sealed only after every worker of round r has exited, so
the final checkpoint of round r still commits. A worker cut off with its node, whose peers
have sealed a newer round without it, is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from elastic.errors import RendezvousConnectionError, StaleRoundError
from elastic.exchange import env as names

class RoundFence:
    """Callable commit guard: raises StaleRoundError once a newer round has been sealed."""

    def __init__(self, config, key_prefix: str, run_id: str, round_: int, retry_for: float = 15.0) -> None:
        self._config = config
        self._key = f"/{key_prefix.strip('/')}/{run_id}/sealed_round"
        self.round = round_
        self._retry_for = retry_for
        self._client = None

    def newest_sealed_round(self) -> int | None:
        """Read the newest sealed round, retrying through a short etcd outage."""
        from elastic.rendezvous.etcd_client import TRANSIENT_ERRORS, connect  # noqa: PLC0415  (gRPC only when needed)

        deadline = time.monotonic() + self._retry_for
        while True:
            try:
                if self._client is None:
                    self._client = connect(self._config, check=False)
                raw, _ = self._client.get(self._key)
                return int(raw) if raw is not None else None
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise RendezvousConnectionError(
                        f"cannot check the rendezvous round at {self._config.endpoint} before a "
                        f"commit: etcd did not answer for {self._retry_for:g}s") from exc
                time.sleep(0.5)

    def __call__(self) -> None:
        newest = self.newest_sealed_round()
        if newest != self.round:
            raise StaleRoundError(
                f"commit refused: this worker belongs to rendezvous round {self.round} but the "
                f"newest sealed round is {newest}; a newer group has taken over the job")

    def close(self) -> None:
        """Close the etcd client opened by the first check (a later check opens another).
        The CheckpointManager holding this fence calls it when the fence is replaced or closed."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RoundFence:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def commit_guard_from_env(env: Mapping[str, str] = os.environ) -> Callable[[], None] | None:
    """The fence for this worker, or None outside `elastic-run` (torchrun, single process)."""
    round_, endpoint = env.get(names.ROUND), env.get(names.RDZV_ENDPOINT)
    if not round_ or not endpoint:
        return None
    from elastic.rendezvous.etcd_client import EtcdConfig  # noqa: PLC0415  (gRPC only when needed)

    return RoundFence(EtcdConfig(endpoint, **names.rdzv_security_from_env(env)), env.get(names.RDZV_PREFIX, "elastic"),
                      env.get("TORCHELASTIC_RUN_ID", "default"), int(round_))
