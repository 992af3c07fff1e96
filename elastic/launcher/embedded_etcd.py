"""The etcd of `--rdzv-backend c10d` (also static and etcd-v2 with an endpoint): the agent whose
host owns the endpoint's address serves it on that port, as torchrun's c10d host serves its
TCPStore, and every agent rendezvouses through it with the full elastic protocol.

That etcd lives and dies with its node: if that node goes, the job's rendezvous goes with it
(point --rdzv-endpoint at a real etcd cluster to survive it). Its agent therefore stays,
once its own work is over, until the other agents have left (or their leases lapsed).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time

from elastic.errors import ConfigError, RendezvousConnectionError
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.rendezvous.etcd_server import EtcdServer


def local_address_of(host: str) -> str | None:
    """The address of `host` if it is one of this machine's (bindable here), else None."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    for *_, sockaddr in infos:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
            except OSError:
                continue
            return sockaddr[0]
    return None


class EmbeddedEtcd:
    """Serve the endpoint's etcd if this host owns its address and no agent here serves it yet."""

    def __init__(self, endpoint: str) -> None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT")
        self.server: EtcdServer | None = None
        self._lock = -1
        addr = local_address_of(host)
        if addr is None:
            return  # another node serves it
        # Several agents on this host: the first to take the port's lock serves it.
        path = os.path.join(tempfile.gettempdir(), f"elastic-etcd-{os.getuid()}-{addr}-{port}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        self._lock = fd
        self.server = EtcdServer(host=addr, port=int(port), fixed_port=True).start()

    def wait_for_peers(self, client, key_prefix: str, run_id: str, timeout: float) -> None:
        """Before the etcd goes: wait until no other agent of the run is alive (their `alive`
        keys go when they shut down, or when their lease lapses), at most `timeout` seconds."""
        alive = f"/{key_prefix.strip('/')}/{run_id}/alive/"  # the layout of elastic/rendezvous/etcd_state.py
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and client.get_prefix_response(alive, count_only=True).count:
            time.sleep(0.2)  # agents leave without notice; a watch would add a thread for this

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def connect_when_up(etcd: EtcdConfig, wait: float):
    """Connect to an etcd that another node may not have started yet, for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return connect(etcd)
        except RendezvousConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)  # the serving node is still starting: nothing to watch yet
