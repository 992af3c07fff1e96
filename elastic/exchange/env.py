"""The environment variables elastic-run gives its workers, beyond torchrun's own.

The launcher writes them (elastic/launcher/worker_group.py); the worker side reads them
(elastic/worker/context.py, the round fence, the checkpoint manager). One place for the
names, so that the two sides cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from elastic.errors import ConfigError

ROUND = "ELASTIC_ROUND"  # the rendezvous round this worker belongs to
NODE_ID = "ELASTIC_NODE_ID"
CHECKPOINT_DIR = "ELASTIC_CHECKPOINT_DIR"  # --checkpoint-dir
# The node's shared-memory directory for the checkpoint memory tier, owned by the agent for
# the run (elastic/launcher/memory_dir.py), so that it outlives the workers.
MEMORY_DIR = "ELASTIC_MEMORY_DIR"
PROGRESS_FILE = "ELASTIC_PROGRESS_FILE"  # elastic/exchange/progress.py
ERROR_FILE = "ELASTIC_ERROR_FILE"  # elastic/exchange/error_record.py
CONTROL_FILE = "ELASTIC_CONTROL_FILE"  # elastic/exchange/control.py (with --reconfigure)
RDZV_ENDPOINT = "ELASTIC_RDZV_ENDPOINT"  # the etcd the round fence reads
RDZV_PREFIX = "ELASTIC_RDZV_PREFIX"
# The etcd password for the round fence: a file only the user can read, in the agent's run
# directory. The password itself is never in a worker's environment nor in any argv.
RDZV_PASSWORD_FILE = "ELASTIC_RDZV_PASSWORD_FILE"
# elastic-run's own input (like etcdctl's ETCDCTL_PASSWORD); removed from workers' environment.
RDZV_PASSWORD = "ELASTIC_RDZV_PASSWORD"

# Settings of elastic-run itself that workers must not inherit: the password, and gRPC's fork
# setting made for the agent (elastic/rendezvous/etcd_client.py; a worker importing it sets it again).
LAUNCHER_ONLY = (RDZV_PASSWORD, "GRPC_ENABLE_FORK_SUPPORT")

# The etcd TLS/auth settings (RendezvousSettings field -> variable), for the round fence.
_RDZV_SECURITY = {"ca_cert": "ELASTIC_RDZV_CA_CERT", "cert": "ELASTIC_RDZV_CERT", "key": "ELASTIC_RDZV_KEY",
                  "user": "ELASTIC_RDZV_USER"}


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


def rdzv_security_env(settings: Any, password_file: str | None) -> dict[str, str]:
    """The variables that carry the etcd TLS/auth settings (a RendezvousSettings) to workers;
    the password stays in `password_file` (see write_password_file)."""
    env = {var: getattr(settings, name) for name, var in _RDZV_SECURITY.items() if getattr(settings, name)}
    if settings.password is not None and password_file is not None:
        env[RDZV_PASSWORD_FILE] = password_file
    return env


def write_password_file(path: str, password: str) -> None:
    """Write the etcd password where only this user can read it (mode 0600, created anew)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)


def read_password_file(path: str) -> str:
    """A password file's content, without the line end an editor adds."""
    try:
        with open(path) as f:
            return f.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read the etcd password file {path} ({exc.strerror})") from None


def rdzv_security_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS/auth settings back from a worker's environment, as EtcdConfig keywords."""
    found = {name: env[var] for name, var in _RDZV_SECURITY.items() if env.get(var)}
    if env.get(RDZV_PASSWORD_FILE):
        found["password"] = read_password_file(env[RDZV_PASSWORD_FILE])
    return found
