"""torchrun's static rendezvous: a fixed world of N nodes, this one rank R, the group's store
at --master-addr:--master-port, and no etcd.

It answers the Agent's calls as the etcd rendezvous does (elastic/rendezvous/handler.py and
running_round.py), from what the command line fixed. Without a shared store a node learns of
another node's failure only through its own workers failing (their collectives error out),
and restarts its local group then, as torchrun's static agents do; every node counts its own
restarts against --max-restarts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from elastic.launcher.torchrun_flags import StaticMaster
from elastic.rendezvous.protocol import Assignment, JobClosed
from elastic.rendezvous.status_key import NodeStatus


class StaticRendezvous:
    """The rendezvous calls the Agent, Recovery and round_watch make, for a fixed world."""

    lease_lost = False  # no lease: nothing can expire

    def __init__(self, master: StaticMaster, num_nodes: int, nproc_per_node: int, node_id: str,
                 local_addr: str) -> None:
        self._master = master
        self._num_nodes = num_nodes
        self._nproc = nproc_per_node
        self.node_id = node_id
        self._local_addr = local_addr
        self._round = 0
        self._restarts = 0
        self._closed: JobClosed | None = None
        self._status: NodeStatus | None = None  # no etcd to publish to: only this node's is known
        self._woken = threading.Event()
        self.should_abort: Callable[[], None] = lambda: None

    # -- lifecycle and joining ----------------------------------------------------------------

    def start(self) -> None:
        """Nothing to announce: the command line fixed the world."""

    def renew(self) -> None:
        """No lease to renew."""

    def shutdown(self) -> None:
        self._woken.set()

    def join(self) -> Assignment:
        self.should_abort()
        return Assignment(round=self._round, group_rank=self._master.node_rank, num_nodes=self._num_nodes,
                          world_size=self._num_nodes * self._nproc,
                          rank_offset=self._master.node_rank * self._nproc, master_addr=self._master.addr,
                          master_port=self._master.port, restart_count=self._restarts,
                          local_addr=self._local_addr)

    # -- while a round runs --------------------------------------------------------------------

    def wait_for_change(self, timeout: float) -> bool:
        """Nothing changes from outside but a signal (wake); otherwise wait out `timeout`."""
        woken = self._woken.wait(timeout)
        self._woken.clear()
        return woken

    def wake(self) -> None:
        self._woken.set()

    def current_round(self) -> int:
        return self._round

    def closed(self) -> JobClosed | None:
        return self._closed

    def ended_by_failure(self, round_: int) -> bool:
        return round_ < self._round

    def restart_count(self) -> int:
        return self._restarts

    def sealed_members(self, round_: int) -> tuple[str, ...]:
        return (self.node_id,)  # peers are not known by name, only by their workers' collectives

    def replica_endpoints(self, round_: int, node_ids: tuple[str, ...]) -> dict[str, tuple[str, int]]:
        return {}  # no registrations: the agent serves no memory checkpoints (Agent.__init__)

    def departed_members(self, round_: int, members: tuple[str, ...]) -> list[str]:
        return []

    def should_grow(self, round_: int) -> bool:
        return False

    def debounce_left(self) -> float | None:
        return None

    def blame(self, round_: int, when: float, window: float = 0.3) -> str:
        return self.node_id  # no claims to compare: the failure seen here is this node's

    def bump_round(self, round_: int, *, reason: str, failed_node: str | None = None,
                   restart: bool = True) -> bool:
        if round_ != self._round:
            return False
        self._round += 1
        if failed_node is not None and restart:
            self._restarts += 1
        return True

    def mark_done(self, round_: int) -> None:
        self._closed = JobClosed(ok=True, reason=f"every worker of round {round_} on this node exited 0")

    def leave(self, round_: int) -> None:
        self.bump_round(round_, reason=f"node {self.node_id} leaves")

    def close(self, *, ok: bool, reason: str) -> None:
        self._closed = JobClosed(ok=ok, reason=reason)

    def publish_status(self, status: NodeStatus, *, on_lease: bool = True) -> None:
        self._status = status

    def peer_statuses(self) -> dict[str, NodeStatus]:
        return {self.node_id: self._status} if self._status is not None else {}
