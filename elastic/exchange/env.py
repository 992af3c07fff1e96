"""The environment variables elastic-run gives its workers, beyond torchrun's own.

The launcher writes them (elastic/launcher/worker_group.py); the worker side reads them
(elastic/worker/context.py, the round fence, the checkpoint manager). One place for the
names, so that the two sides cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elastic.errors import ConfigError

ROUND = "ELASTIC_ROUND"  # the rendezvous round this worker belongs to
NODE_ID = "ELASTIC_NODE_ID"
CHECKPOINT_DIR = "ELASTIC_CHECKPOINT_DIR"  # --checkpoint-dir
PROGRESS_FILE = "ELASTIC_PROGRESS_FILE"  # elastic/exchange/progress.py
ERROR_FILE = "ELASTIC_ERROR_FILE"  # elastic/exchange/error_record.py
CONTROL_FILE = "ELASTIC_CONTROL_FILE"  # elastic/exchange/control.py (with --reconfigure)
RDZV_ENDPOINT = "ELASTIC_RDZV_ENDPOINT"  # the etcd the round fence reads
RDZV_PREFIX = "ELASTIC_RDZV_PREFIX"

# The etcd TLS/auth settings (RendezvousSettings field -> variable), for the round fence.
_RDZV_SECURITY = {"ca_cert": "ELASTIC_RDZV_CA_CERT", "cert": "ELASTIC_RDZV_CERT", "key": "ELASTIC_RDZV_KEY",
                  "user": "ELASTIC_RDZV_USER", "password": "ELASTIC_RDZV_PASSWORD"}


def int_var(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    """An integer variable set by the launcher; `default` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; the launcher sets it") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def rdzv_security_env(settings: Any) -> dict[str, str]:
    """The variables that carry the etcd TLS/auth settings (a RendezvousSettings) to workers."""
    return {var: getattr(settings, name) for name, var in _RDZV_SECURITY.items() if getattr(settings, name)}


def rdzv_security_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS/auth settings back from a worker's environment, as EtcdConfig keywords."""
    return {name: env[var] for name, var in _RDZV_SECURITY.items() if env.get(var)}
