"""The one module that imports the etcd client library.

Everything else asks this module for a connected client, so the client library can be
swapped (python3-etcd3 today) without touching the protocol code.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

# gRPC's fork handlers only print warnings here: agents fork workers while watch threads run.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import etcd3  # noqa: E402  (after the gRPC setting above)
import grpc  # noqa: E402
import etcd3.events  # noqa: E402
import etcd3.exceptions  # noqa: E402
import etcd3.transactions  # noqa: E402
import etcd3.utils  # noqa: E402
import etcd3.watch  # noqa: E402

from elastic.errors import ConfigError, RendezvousConnectionError  # noqa: E402

# python3-etcd3 0.13 dropped its `six` dependency but etcd3/watch.py still calls
# six.itervalues() when a watch stream breaks, so watchers never hear of the failure (a
# NameError kills the thread instead). Supply the one function it uses.
if not hasattr(etcd3.watch, "six"):
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(d.values()))

# Errors that mean "etcd is not answering right now" (worth a retry with backoff).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    etcd3.exceptions.ConnectionFailedError,
    etcd3.exceptions.ConnectionTimeoutError,
    etcd3.exceptions.InternalServerError,
    etcd3.exceptions.WatchTimedOut,
)


# Anything the client raises for a failed request (for best-effort calls such as cleanup).
ANY_ETCD_ERROR: tuple[type[BaseException], ...] = (grpc.RpcError, etcd3.exceptions.Etcd3Exception)

# After an outage or a partition, reconnect within seconds of etcd answering again:
# keepalive pings find a connection whose packets vanish (no reset ever comes), and connect
# attempts (min_reconnect_backoff is gRPC's connect timeout) and the pauses between them
# stay short (gRPC's defaults: 20 s and up to 2 min). etcd refuses pings more often than
# every 5 s (its --grpc-keepalive-min-time).
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# The client types the rendezvous backend needs beyond the client object itself.
DeleteEvent = etcd3.events.DeleteEvent
Put = etcd3.transactions.Put


def prefix_range_end(prefix: str) -> bytes:
    """The range end that makes a delete or read cover every key starting with `prefix`."""
    return etcd3.utils.prefix_range_end(prefix.encode())


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to authenticate. Built once from flags, then passed around."""

    endpoint: str  # HOST:PORT
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 5.0

    def __post_init__(self) -> None:
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"rendezvous endpoint {self.endpoint!r} is not HOST:PORT (for example 10.0.0.1:2379)"
            )
        if (self.cert is None) != (self.key is None):
            raise ConfigError("etcd TLS needs both a client certificate and its key (cert and key)")
        if (self.user is None) != (self.password is None):
            raise ConfigError("etcd auth needs both a user and a password")

    @property
    def host(self) -> str:
        return self.endpoint.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.endpoint.rpartition(":")[2])


def connect(config: EtcdConfig, *, check: bool = True) -> etcd3.Etcd3Client:
    """Return a client for `config`; with `check`, fail fast if etcd does not answer."""
    try:
        # With user/password the client authenticates here, so this can already fail.
        client = etcd3.client(
            host=config.host,
            port=config.port,
            ca_cert=config.ca_cert,
            cert_cert=config.cert,
            cert_key=config.key,
            user=config.user,
            password=config.password,
            timeout=config.timeout,
            grpc_options=_GRPC_OPTIONS,
        )
        # The client marks an endpoint that failed once as unusable for 5 minutes and then
        # raises ValueError on every call; with one etcd endpoint we want gRPC to reconnect
        # as soon as etcd is back (an etcd restart must not take the job down).
        for endpoint in client.endpoints.values():
            endpoint.time_retry = 0.0
        if not client.uses_secure_channel:
            # gRPC refuses call credentials on a plaintext channel; the auth token still
            # travels in the request metadata, which the client sends as well.
            client.call_credentials = None
        if check:
            client.status()
    except TRANSIENT_ERRORS as exc:
        raise RendezvousConnectionError(
            f"cannot reach etcd at {config.endpoint}: check --rdzv-endpoint and that etcd runs "
            "there (or use --standalone for a private one)"
        ) from exc
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION):
            raise RendezvousConnectionError(
                f"etcd refused the credentials at {config.endpoint} ({exc.details()}): check the "
                "user in --rdzv-conf and the password (password_file= or $ELASTIC_RDZV_PASSWORD)"
            ) from exc
        raise
    return client
