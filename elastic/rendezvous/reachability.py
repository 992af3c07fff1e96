"""Can this node reach its peers? A TCP listener every agent keeps open on the address it
registered (where its workers' peers will connect), and a probe that connects to all peers'
listeners at once.

A node that keeps etcd but loses its peers (an asymmetric partition) looks healthy to the
rendezvous: its lease lives. Its workers would hang in the process-group set-up or in the
first collective. Probing before the workers start, and when a round fails, tells the
rendezvous which node the others cannot reach (elastic/rendezvous/blame.py judges).

A node probes a bounded set of peers (`probe_targets`): the round's first node, which hosts
the store every rank connects to, and its neighbours on the ring of members. Probing all
peers costs N^2 connections per round: at 1,024 nodes a million connects, and the bursts
of 1,023 SYNs overflow listeners' accept queues, so healthy peers look cut off. A node cut
off from everyone is still seen by both ends: it reports its neighbours, they report it.

`Prober` does the probing while the node waits for the round to form, on the peers it
would have if the round sealed as it stands, and keeps them verified; the check once the
round is sealed then probes only the peers that changed. A verification holds for a lease
TTL (what etcd knows of a peer's liveness is no fresher) and until the node sees a failure.
The probes start as soon as the expected peers change: waiting for a burst of arrivals to
settle first made them pile up right before the seal (1,024 agents: p99 490 -> 691 ms).
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
    ring = node_ids if me in node_ids else [*node_ids, me]
    at, size = ring.index(me), len(ring)
    # Positions, not a scan of the ring: every agent of a 1,024-node round calls this at once.
    chosen = {0} | {(at + d) % size for d in range(-neighbours, neighbours + 1)}
    return [ring[i] for i in sorted(chosen - {at})]


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


Targets = dict[str, tuple[str, int]]  # peer name -> (addr, probe port)


class Prober:
    """Reachability checks that remember which peers answered, and a background thread that
    verifies the peers a forming round will probably need (`expect`), so that the check
    when it seals (`unreachable`) finds them done. A peer is remembered by its address and
    port: a restarted agent listens on a new port and is probed again."""

    def __init__(self, timeout: float, fresh_for: float, clock=time.monotonic) -> None:
        self._timeout = timeout
        self._fresh_for = fresh_for
        self._clock = clock
        self._answered: dict[tuple[str, int], float] = {}  # (addr, port) -> when it answered
        self._forgotten = 0  # forget() calls: a probe begun before one must not be remembered
        self._expected: Targets = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def unreachable(self, targets: Targets) -> list[str]:
        """The names in `targets` that do not answer now; peers verified lately are not probed."""
        return self._probe(self.unverified(targets))

    def unverified(self, targets: Targets) -> Targets:
        """The part of `targets` not verified within the lifetime of a verification."""
        return self._verified_before(targets, self._fresh_for)

    def _verified_before(self, targets: Targets, age: float) -> Targets:
        """The part of `targets` last verified at least `age` seconds ago (or never)."""
        return {n: t for n, t in targets.items() if self._age(t) >= age}

    def expect(self, targets: Targets) -> None:
        """Verify these peers in the background, and keep them verified, until the next call."""
        with self._changed:
            if targets == self._expected:
                return  # the usual case: an event that did not change this node's peers
            self._expected = dict(targets)
            if not targets:
                return  # nothing to do now: the thread finds out when it next wakes
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep_verified, name="reachability-expect",
                                                daemon=True)
                self._thread.start()
            self._changed.notify()

    def forget(self) -> None:
        """Something failed: what was verified before it says little now."""
        with self._changed:
            self._answered.clear()
            self._forgotten += 1

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _age(self, target: tuple[str, int]) -> float:
        with self._changed:
            answered = self._answered.get(target)
        return self._clock() - answered if answered is not None else float("inf")

    def _probe(self, targets: Targets) -> list[str]:
        with self._changed:
            started, forgotten = self._clock(), self._forgotten
        failed = unreachable(targets, self._timeout) if targets else []
        with self._changed:
            if self._forgotten == forgotten:
                self._answered.update((t, started) for n, t in targets.items() if n not in failed)
            for stale in [t for t, at in self._answered.items() if started - at >= self._fresh_for]:
                del self._answered[stale]  # peers long gone from the round
        return failed

    def _keep_verified(self) -> None:
        """Probe the expected peers not verified, or verified half a lifetime ago; then sleep
        until the oldest verification is that old again, or `expect` names other peers."""
        renew_at = self._fresh_for / 2
        while True:
            with self._changed:
                if self._closed:
                    return
                expected = self._expected
            self._probe(self._verified_before(expected, renew_at))
            with self._changed:
                if self._expected is expected and not self._closed:
                    # Peers that did not answer are tried again at the next wake, not at once.
                    due = [renew_at - age for age in map(self._age, expected.values()) if age < renew_at]
                    self._changed.wait(min(due, default=renew_at) if expected else None)
