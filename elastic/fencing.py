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

# Worker environment variables that carry the etcd connection (set by elastic-run).
_ENV_TLS = {"ca_cert": "ELASTIC_RDZV_CA_CERT", "cert": "ELASTIC_RDZV_CERT", "key": "ELASTIC_RDZV_KEY",
            "user": "ELASTIC_RDZV_USER", "password": "ELASTIC_RDZV_PASSWORD"}


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
        from elastic.etcd_client import TRANSIENT_ERRORS, connect  # noqa: PLC0415  (gRPC only when needed)

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


def commit_guard_from_env(env: Mapping[str, str] = os.environ) -> Callable[[], None] | None:
    """The fence for this worker, or None outside `elastic-run` (torchrun, single process)."""
    round_, endpoint = env.get("ELASTIC_ROUND"), env.get("ELASTIC_RDZV_ENDPOINT")
    if not round_ or not endpoint:
        return None
    from elastic.etcd_client import EtcdConfig  # noqa: PLC0415  (gRPC only when needed)

    tls = {name: env[var] for name, var in _ENV_TLS.items() if env.get(var)}
    return RoundFence(EtcdConfig(endpoint, **tls), env.get("ELASTIC_RDZV_PREFIX", "elastic"),
                      env.get("TORCHELASTIC_RUN_ID", "default"), int(round_))


def fence_env(settings) -> dict[str, str]:
    """The worker variables that let `commit_guard_from_env` reach etcd like the agent does."""
    values = {"ca_cert": settings.ca_cert, "cert": settings.cert, "key": settings.key,
              "user": settings.user, "password": settings.password}
    return {_ENV_TLS[name]: value for name, value in values.items() if value}
