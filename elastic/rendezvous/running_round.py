"""The agent's side of a running round: what it asks (is the round still current, is a
member gone, should the round grow) and what it reports (a new round, its workers done,
leaving, the job closed).

A member whose agent is gone without finishing or leaving ends the round with a failure;
nodes waiting to join end it to grow, once their arrivals are debounced. Every agent sees
these by the same watch event; only one acts at once (protocol.takeover_at).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.protocol import JobClosed, Settings, decide_growth, takeover_at
from elastic.rendezvous.settings import RendezvousJob
from elastic.rendezvous.status_key import NodeStatus

log = logging.getLogger(__name__)


class RunningRound:
    """The calls the agent makes while its round runs, all on the mirror but the writes."""

    def __init__(self, backend: EtcdBackend, config: RendezvousJob, clock: Callable[[], float]) -> None:
        self._backend = backend
        self._config = config
        self._clock = clock
        self._settings = Settings(
            min_nodes=config.min_nodes, max_nodes=config.max_nodes,
            last_call_timeout=config.rdzv.last_call_timeout,
            world_size_multiple=config.rdzv.world_size_multiple,
            cooldown_base=config.rdzv.cooldown_base, cooldown_cap=config.rdzv.cooldown_cap,
            rejoin_timeout=config.rdzv.join_timeout,
        )
        self._growth_seen: float | None = None
        self._gone_seen: tuple[int, float] | None = None  # (round, when a departure was first seen)

    @property
    def node_id(self) -> str:
        return self._backend.node_id

    def wait_for_change(self, timeout: float) -> bool:
        """Block until some key of the run changed (True) or `timeout` passed (False)."""
        return self._backend.wait(self._backend.version, timeout)

    def wake(self) -> None:
        self._backend.poke()

    def current_round(self) -> int:
        return self._backend.current_round()

    def closed(self) -> JobClosed | None:
        """Why the job is over, once it is."""
        return self._backend.closed()

    def ended_by_failure(self, round_: int) -> bool:
        """Whether round `round_` was ended because something failed (vs. a planned change)."""
        end = self._backend.round_end(round_)
        return end is not None and end.failure

    def restart_count(self) -> int:
        return self._backend.restarts()

    def sealed_members(self, round_: int) -> tuple[str, ...]:
        sealed = self._backend.sealed(round_)
        return sealed.node_ids if sealed else ()

    def replica_endpoints(self, round_: int, node_ids: tuple[str, ...]) -> dict[str, tuple[str, int]]:
        """Where the agents of `node_ids` (members of `round_`) serve their memory checkpoints."""
        registered = self._backend.members(round_, only=node_ids)
        return {n: (m.addr, m.replica_port) for n, m in registered.items() if m.replica_port}

    def departed_members(self, round_: int, members: tuple[str, ...]) -> list[str]:
        """Members of a running round whose agent is gone without finishing or leaving.

        Reported at once to the first live member of the round, which bumps the round; to
        the k-th only after k times TAKEOVER_DELAY (they see the bump by watch well before).
        """
        alive = self._backend.alive()
        if alive.issuperset(members):
            return []  # the usual answer, found in C: every agent asks on every change
        finished = self._backend.finished(round_)
        gone = [n for n in members if n not in alive and n not in finished]
        if not gone:
            return []
        now = self._clock()
        if self._gone_seen is None or self._gone_seen[0] != round_:
            self._gone_seen = (round_, now)
        live = tuple(n for n in members if n not in gone)
        return gone if now >= takeover_at(self._gone_seen[1], live, self.node_id) else []

    def should_grow(self, round_: int) -> bool:
        """True once waiting nodes have been debounced and would enlarge the running round."""
        state = self._backend.state()
        running = self._backend.sealed(round_)
        if not state.waiting or running is None:
            self._growth_seen = None
            return False
        now = self._clock()
        self._growth_seen = self._growth_seen if self._growth_seen is not None else now
        return decide_growth(state, running, self._settings, now, self._growth_seen)

    def debounce_left(self) -> float | None:
        """Seconds until a pending growth decision is due (None when nothing is pending)."""
        if self._growth_seen is None:
            return None
        return max(0.0, self._growth_seen + self._settings.last_call_timeout - self._clock())

    def bump_round(self, round_: int, *, reason: str, failed_node: str | None = None,
                   restart: bool = True) -> bool:
        """Move the job on from `round_`; with `failed_node` it spends one restart (if `restart`)."""
        won = self._backend.bump_round(round_, reason=reason, failed_node=failed_node, restart=restart)
        if won:
            log.info("rendezvous: run %s round %d -> %d: %s", self._config.run_id, round_, round_ + 1, reason)
        return won

    def mark_done(self, round_: int) -> None:
        """This node's workers all exited 0. The last member of the round to finish closes the
        job as a success, so that spares still waiting to join learn it is over."""
        self._backend.mark(round_, "done")
        sealed = self._backend.sealed(round_)
        if sealed is not None and set(sealed.node_ids) <= self._backend.finished(round_):
            self._backend.close(ok=True, reason=f"job finished: every worker of round {round_} exited 0")

    def leave(self, round_: int) -> None:
        """Leave the job on purpose: peers go on without this node, and no restart is spent."""
        self._backend.mark(round_, "left")
        self.bump_round(round_, reason=f"node {self.node_id} leaves")

    def close(self, *, ok: bool, reason: str) -> None:
        self._backend.close(ok=ok, reason=reason)

    def publish_status(self, status: NodeStatus, *, on_lease: bool = True) -> None:
        """Write this node's live status key (elastic/rendezvous/status_key.py)."""
        self._backend.put_status(status, on_lease=on_lease)

    def peer_statuses(self) -> dict[str, NodeStatus]:
        """Every node's live status, read from etcd (the status keys are not mirrored)."""
        return self._backend.peer_statuses()
