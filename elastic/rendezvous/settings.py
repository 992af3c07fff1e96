"""What the rendezvous needs to know about a job: the `--rdzv-conf` options and the job's shape.

The launcher's `LaunchConfig` carries both; the rendezvous reads them through `RendezvousJob`
so that it depends on nothing of the launcher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from elastic.errors import ConfigError
from elastic.exchange import env as names

# torchrun's spellings of the same options.
_RDZV_CONF_ALIASES = {"timeout": "join_timeout", "ca": "ca_cert", "cacert": "ca_cert",
                      "keepalive_ttl": "lease_ttl", "prefix": "key_prefix"}
# torchrun's c10d store options: accepted so that its --rdzv-conf runs unchanged; an etcd
# lease and watch replace the store's keep-alives, and the endpoint's host always serves.
_TORCHRUN_STORE_ONLY = frozenset({"read_timeout", "close_timeout", "keep_alive_interval",
                                  "keep_alive_max_attempt", "use_libuv", "is_host"})


@dataclass(frozen=True)
class RendezvousSettings:
    """Options of the etcd rendezvous (from `--rdzv-conf key=value,...`)."""

    join_timeout: float = 600.0  # how long to wait for MIN nodes, or for a live survivor to rejoin
    last_call_timeout: float = 2.0  # how long to wait for newcomers once MIN have joined
    lease_ttl: float = 5.0  # a node whose agent stops keeping its lease alive is gone after this
    connect_timeout: float = 5.0  # etcd unreachable at start: fail after this
    outage_timeout: float = 60.0  # etcd unreachable later (outage, partition): give up after this
    probe_timeout: float = 2.0  # a peer that does not answer a TCP connect this fast is unreachable
    key_prefix: str = "elastic"
    world_size_multiple: int = 1  # allowed node counts: multiples of this
    cooldown_base: float = 10.0  # a node failing again waits base*2^(failures-2) s, up to the cap
    cooldown_cap: float = 600.0
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    # Never from argv (ps shows it to every user): from password_file=PATH or $ELASTIC_RDZV_PASSWORD.
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("join_timeout", "last_call_timeout", "lease_ttl", "connect_timeout",
                     "outage_timeout", "probe_timeout", "cooldown_base", "cooldown_cap"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--rdzv-conf {name}={getattr(self, name)} must be > 0 seconds")
        if self.lease_ttl < 2:
            raise ConfigError(f"--rdzv-conf lease_ttl={self.lease_ttl} must be >= 2 seconds (etcd's minimum)")
        if self.world_size_multiple < 1:
            raise ConfigError(f"--rdzv-conf world_size_multiple={self.world_size_multiple} must be >= 1")
        if self.user and self.password is None:
            raise ConfigError(f"--rdzv-conf user={self.user} needs the etcd password: give password_file=PATH "
                              f"or set ${names.RDZV_PASSWORD}")
        if not self.key_prefix.strip("/"):
            raise ConfigError("--rdzv-conf key_prefix must not be empty")

    @classmethod
    def parse(cls, text: str, env: Mapping[str, str] = os.environ) -> RendezvousSettings:
        """Parse 'k=v,k=v'; unknown keys and bad values are ConfigErrors naming the key. The
        password comes from password_file=PATH, else from $ELASTIC_RDZV_PASSWORD in `env`."""
        fields = {f: t for f, t in cls.__annotations__.items() if f != "password"}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            key = _RDZV_CONF_ALIASES.get(key, key)
            if key in _TORCHRUN_STORE_ONLY and sep:
                continue
            if key == "password":
                raise ConfigError(f"--rdzv-conf password=... shows the etcd password to every user of the host "
                                  f"(ps): put it in a file only you can read and give password_file=PATH, "
                                  f"or set ${names.RDZV_PASSWORD}")
            if key == "password_file" and sep:
                values["password"] = names.read_password_file(raw)
                continue
            if not sep or key not in fields:
                known = ", ".join(sorted([*fields, "password_file"]))
                raise ConfigError(f"--rdzv-conf: unknown option {item!r}; known options: {known}")
            kind = fields[key]
            try:
                if "float" in kind:
                    values[key] = float(raw)
                elif "int" in kind:
                    values[key] = int(raw)
                else:
                    values[key] = raw
            except ValueError:
                raise ConfigError(f"--rdzv-conf {key}={raw!r} is not a number") from None
        if values.get("user") and "password" not in values and env.get(names.RDZV_PASSWORD):
            values["password"] = env[names.RDZV_PASSWORD]
        return cls(**values)  # type: ignore[arg-type]


class RendezvousJob(Protocol):
    """The job as the rendezvous sees it (elastic.launcher.config.LaunchConfig is one)."""

    @property
    def run_id(self) -> str: ...
    @property
    def min_nodes(self) -> int: ...
    @property
    def max_nodes(self) -> int: ...
    @property
    def nproc_per_node(self) -> int: ...
    @property
    def rdzv(self) -> RendezvousSettings: ...
