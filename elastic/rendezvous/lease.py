"""This agent's lease, kept alive by a background thread.

The agent's `alive` key and its registrations are bound to its lease, so a node that dies
whole disappears by itself once the lease expires. If etcd tells the keep-alive that the
lease expired (this node was cut off longer than the TTL), the lease is `lost`: the agent
stops its workers and joins again with a new lease.
"""

from __future__ import annotations

import logging
import threading
import time

from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR, TRANSIENT_ERRORS
from elastic.rendezvous.etcd_state import EtcdBackend

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Takes the backend's lease and refreshes it every TTL/3 until `stop` is set."""

    def __init__(self, backend: EtcdBackend, ttl: float, stop: threading.Event) -> None:
        self._backend = backend
        self._ttl = ttl
        self._stop = stop
        self._thread: threading.Thread | None = None
        self._refreshed_at = float("-inf")  # time.monotonic() of the last lease grant or refresh
        self.lost = False

    def take(self) -> None:
        """Take a new lease; the first one starts the keep-alive thread."""
        self._backend.open_lease(self._ttl)
        self._refreshed_at = time.monotonic()
        self.lost = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._keep_alive, name="rdzv-keepalive", daemon=True)
            self._thread.start()

    def expired(self) -> bool:
        """Before joining: whether this agent was cut off (or stopped) past its TTL, so that
        it needs a new lease."""
        if not self.lost and time.monotonic() - self._refreshed_at < self._ttl / 2:
            return False  # the keep-alive thread refreshed it a moment ago: no request needed
        try:
            alive = self._backend.refresh_lease()
        except TRANSIENT_ERRORS:
            return False  # etcd unreachable: the join itself will wait or fail
        return not alive or self.lost

    def _keep_alive(self) -> None:
        interval = self._ttl / 3
        while not self._stop.wait(interval):
            try:
                if self._backend.refresh_lease():
                    self._refreshed_at = time.monotonic()
                else:
                    log.warning("rendezvous: node %s lost its lease (cut off from etcd for more "
                                "than %.0fs); its workers stop and it joins again", self._backend.node_id, self._ttl)
                    self.lost = True
                    self._backend.poke()
                interval = self._ttl / 3
            except ANY_ETCD_ERROR as exc:  # this thread must outlive any error: it is the heartbeat
                log.warning("rendezvous: lease refresh failed (%s); retrying", type(exc).__name__)
                interval = min(0.5, self._ttl / 3)
