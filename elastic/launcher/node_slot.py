"""A node id for an agent started without --node-id: the host name, plus a slot number when
several agents of one run share the host (torchrun's own tests start two on one machine).

Each agent takes the first free slot of its run on this host, held by an exclusive lock on a
file for as long as the agent lives; the kernel drops the lock the moment the agent dies,
however it dies, so an agent restarted on this host takes its old slot (and id) again. Slot
0 is the bare host name, the id agents had before slots existed. Across hosts, etcd still
refuses an id held by another live agent (EtcdBackend.announce).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile

from elastic.errors import ConfigError

MAX_SLOTS = 1024


class NodeSlot:
    """This agent's slot; the lock is held until close() or the process ends."""

    def __init__(self, run_id: str, host: str | None = None, lock_dir: str | None = None) -> None:
        self.host = host or socket.gethostname()
        tag = hashlib.sha1(f"{self.host}/{run_id}".encode()).hexdigest()[:16]
        base = os.path.join(lock_dir or tempfile.gettempdir(), f"elastic-node-{os.getuid()}-{tag}")
        for slot in range(MAX_SLOTS):
            fd = os.open(f"{base}-{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.slot, self._fd = slot, fd
            return
        raise ConfigError(f"{MAX_SLOTS} agents of this run already run on {self.host}: give each a --node-id")

    @property
    def node_id(self) -> str:
        return self.host if self.slot == 0 else f"{self.host}-slot{self.slot}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
