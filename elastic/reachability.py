"""Can this node reach its peers? A TCP listener every agent keeps open on the address it
registered (where its workers' peers will connect), and a probe that connects to all peers'
listeners at once.

A node that keeps etcd but loses its peers (an asymmetric partition) looks healthy to the
rendezvous: its lease lives. Its workers would hang in the process-group set-up or in the
first collective. Probing before the workers start, and when a round fails, tells the
rendezvous which node the others cannot reach (elastic/rdzv_protocol.py decides).

A node probes a bounded set of peers (`probe_targets`): the round's first node, which hosts
the store every rank connects to, and its neighbours on the ring of members. Probing all
peers costs N^2 connections per round: at 1,024 nodes a million connects, and the bursts
of 1,023 SYNs overflow listeners' accept queues, so healthy peers look cut off. A node cut
off from everyone is still seen by both ends: it reports its neighbours, they report it.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from collections.abc import Sequence

# connect() errors that still prove the path works: the host answered (no one listening).
_ANSWERED = {0, errno.ECONNREFUSED, errno.EISCONN}
RING_NEIGHBOURS = 2  # peers probed on each side: a node is checked by 2 x this many others


def probe_targets(node_ids: Sequence[str], me: str, neighbours: int = RING_NEIGHBOURS) -> list[str]:
    """The peers `me` probes in a round of `node_ids` (rank order): the first node and the
    `neighbours` nearest on each side on the ring. A node not in the round (a spare asking
    to be let in) probes as if it were appended last, where it would join."""
    ring = list(node_ids) if me in node_ids else [*node_ids, me]
    at, size = ring.index(me), len(ring)
    chosen = {ring[0]} | {ring[(at + d) % size] for d in range(-neighbours, neighbours + 1)}
    return [n for n in ring if n in chosen and n != me]


class ProbeListener:
    """Accepts and at once closes connections on (addr, an ephemeral port), in a daemon thread."""

    def __init__(self, addr: str) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((addr, 0))
        self._sock.listen(socket.SOMAXCONN)  # the first node is probed by every other
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, name="reachability", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn.close()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected: close() alone stops accept() on some kernels, shutdown on others
        self._sock.close()


def unreachable(targets: dict[str, tuple[str, int]], timeout: float) -> list[str]:
    """The names in `targets` (name -> (addr, port)) that did not answer a TCP connect within
    `timeout` seconds. All connects run at once, so this takes at most `timeout`."""
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, str] = {}
    failed: list[str] = []
    for name, (addr, port) in targets.items():
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((addr, port))
        if code in _ANSWERED:
            sock.close()
        elif code == errno.EINPROGRESS:
            pending[sock] = name
            selector.register(sock, selectors.EVENT_WRITE)
        else:  # no route, network unreachable...
            sock.close()
            failed.append(name)
    deadline = time.monotonic() + timeout
    while pending and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            sock = key.fileobj
            selector.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) not in _ANSWERED:
                failed.append(pending[sock])
            del pending[sock]
            sock.close()
    for sock, name in pending.items():  # timed out: packets dropped on the way
        failed.append(name)
        sock.close()
    selector.close()
    return sorted(failed)
