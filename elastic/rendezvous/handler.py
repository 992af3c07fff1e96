"""The rendezvous handler the agent uses: join rounds, watch the job, report failures.

It runs the loop "sync, decide, apply": the etcd backend keeps a mirror of the run's keys
(elastic/rdzv_etcd.py), the pure protocol decides (elastic/rdzv_protocol.py), and only this
module turns decisions into writes. The lease is kept alive by a background thread; if etcd
tells it the lease expired (this node was cut off longer than the TTL), `lease_lost` is set
and the agent stops its workers and joins again with a new lease.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from elastic.errors import ConfigError, RendezvousClosedError, RendezvousTimeoutError
from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR, TRANSIENT_ERRORS
from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.protocol import (
    Assignment,
    Closed,
    FailureClaim,
    Joined,
    Member,
    Register,
    RunState,
    Seal,
    SealedRound,
    Settings,
    Wait,
    WaitAsSpare,
    admissible,
    completing_record,
    decide_blame,
    decide_growth,
    decide_join,
)
from elastic.rendezvous.settings import RendezvousJob
from elastic.rendezvous.reachability import Prober, ProbeListener, Targets, probe_targets

log = logging.getLogger(__name__)

# When a round can be sealed (or a member is gone), every agent sees it by the same watch
# event. Only one agent acts at once: the first node of the record to seal (or the first live
# member of the running round); the k-th in that order acts only if nothing happened for k
# times this long (the ones before it may have died, their leases not yet expired). Without
# this, all N agents send the same compare-and-swap and N-1 of them fail; with one common
# delay, they all do so at once whenever the first one is slower than the delay.
TAKEOVER_DELAY = 1.0


def _takeover_at(since: float, order: tuple[str, ...], node: str) -> float:
    """When `node` acts on something first seen at `since`, if nobody before it in `order` has."""
    place = order.index(node) if node in order else len(order)
    return since + place * TAKEOVER_DELAY


class EtcdRendezvous:
    """One agent's handle on the job's rendezvous. Call order: start, join, (watch...), shutdown."""

    def __init__(self, backend: EtcdBackend, config: RendezvousJob, addr: str,
                 pick_port: Callable[[], int], clock: Callable[[], float] = time.time) -> None:
        self._backend = backend
        self._config = config
        self._addr = addr
        self._pick_port = pick_port
        self._clock = clock
        self._settings = Settings(
            min_nodes=config.min_nodes, max_nodes=config.max_nodes,
            last_call_timeout=config.rdzv.last_call_timeout,
            world_size_multiple=config.rdzv.world_size_multiple,
            cooldown_base=config.rdzv.cooldown_base, cooldown_cap=config.rdzv.cooldown_cap,
            rejoin_timeout=config.rdzv.join_timeout,
        )
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None
        self._refreshed_at = float("-inf")  # time.monotonic() of the last lease grant or refresh
        self._growth_seen: float | None = None
        self._gone_seen: tuple[int, float] | None = None  # (round, when a departure was first seen)
        self._probe: ProbeListener | None = None
        self._prober = Prober(config.rdzv.probe_timeout, fresh_for=config.rdzv.lease_ttl)
        self.lease_lost = False
        self.should_abort: Callable[[], None] = lambda: None  # raises to abort a wait (signals)

    @property
    def node_id(self) -> str:
        return self._backend.node_id

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take a lease, announce this agent, and start mirroring the run's keys."""
        if self._probe is None:
            self._probe = ProbeListener(self._addr)
        self._prober.forget()  # a restart after a lost lease: this node may have been cut off
        self._backend.open_lease(self._config.rdzv.lease_ttl)
        self._refreshed_at = time.monotonic()
        self.lease_lost = False
        if self._keepalive is None:
            self._keepalive = threading.Thread(target=self._keep_alive, name="rdzv-keepalive", daemon=True)
            self._keepalive.start()
        if self._backend.start_new_generation_if_over():
            log.info("rendezvous: run %s had ended; starting it again", self._config.run_id)
        self._announce()
        self._backend.sync()

    def _announce(self) -> None:
        """Claim this node id. A restarted agent may find its previous self's claim, which
        lapses within one lease TTL; a claim that outlives that belongs to another agent."""
        deadline = self._clock() + self._config.rdzv.lease_ttl + 1.0
        while not self._backend.announce():
            if self._clock() >= deadline:
                raise ConfigError(
                    f"node id {self.node_id!r} is in use by another live agent of run "
                    f"{self._config.run_id!r}: give each agent its own --node-id")
            self.should_abort()
            time.sleep(0.25)  # waiting for a lease in etcd to lapse; no event announces it

    def renew(self) -> None:
        """After `lease_lost`: a new lease, announced again (the old one is gone in etcd)."""
        self.start()

    def _ensure_lease(self) -> None:
        """Before joining: if this agent was cut off (or stopped) past its TTL, renew the lease."""
        if not self.lease_lost and time.monotonic() - self._refreshed_at < self._config.rdzv.lease_ttl / 2:
            return  # the keep-alive thread refreshed it a moment ago: no request needed
        try:
            alive = self._backend.refresh_lease()
        except TRANSIENT_ERRORS:
            return  # etcd unreachable: the join itself will wait or fail
        if not alive or self.lease_lost:
            log.warning("rendezvous: node %s's lease had expired; taking a new one", self.node_id)
            self.renew()

    def shutdown(self) -> None:
        self._stop.set()
        self._prober.close()
        if self._probe is not None:
            self._probe.close()
        self._backend.shutdown()

    def _keep_alive(self) -> None:
        ttl = self._config.rdzv.lease_ttl
        interval = ttl / 3
        while not self._stop.wait(interval):
            try:
                if self._backend.refresh_lease():
                    self._refreshed_at = time.monotonic()
                else:
                    log.warning("rendezvous: node %s lost its lease (cut off from etcd for more "
                                "than %.0fs); its workers stop and it joins again", self.node_id, ttl)
                    self.lease_lost = True
                    self._backend.poke()
                interval = ttl / 3
            except ANY_ETCD_ERROR as exc:  # this thread must outlive any error: it is the heartbeat
                log.warning("rendezvous: lease refresh failed (%s); retrying", type(exc).__name__)
                interval = min(0.5, ttl / 3)

    # -- joining -----------------------------------------------------------------------------

    def join(self) -> Assignment:
        """Block until this node is a member of a sealed round; return its assignment.

        Raises RendezvousClosedError if the job ended, RendezvousTimeoutError if fewer than
        MIN nodes joined within the join timeout.
        """
        self._ensure_lease()
        deadline = self._clock() + self._config.rdzv.join_timeout
        min_reached_at: float | None = None
        sealable_since: float | None = None
        tracked_round = -1
        waiting = False
        cut_off: list[str] = []
        while True:
            self.should_abort()
            version = self._backend.version
            if self._backend.behind_own_writes():
                self._backend.wait(version, 1.0)
                continue
            state = self._backend.join_state()
            now = self._clock()
            if state.round != tracked_round:
                tracked_round, min_reached_at, sealable_since = state.round, None, None
                deadline = max(deadline, now + self._config.rdzv.join_timeout)  # the job moves: not stuck
            chosen = admissible(state, self._settings, now)
            if len(chosen) >= self._config.min_nodes:
                min_reached_at = min_reached_at if min_reached_at is not None else now
            else:
                min_reached_at = None
            action = decide_join(state, self.node_id, self._settings, now, min_reached_at)
            if isinstance(action, Closed):
                raise RendezvousClosedError(action.reason, ok=action.ok)
            if isinstance(action, (Seal, Wait)):
                self._expect_peers(state, chosen)
            if isinstance(action, Joined):
                self._prober.expect({})
                if not self._peers_reachable(action.assignment.round):
                    continue  # the round was ended; join the next one
                if waiting:
                    self._backend.set_waiting(False)
                self._growth_seen = None
                return dataclasses.replace(action.assignment, local_addr=self._addr)
            if isinstance(action, Register):
                member = Member(self.node_id, self._addr, self._pick_port(), self._config.nproc_per_node,
                                self._probe.port)
                record = completing_record(state, member, self._settings, now, min_reached_at)
                if self._backend.register(state.round, member, seal=record):
                    log.info("rendezvous: node %s joined round %d of run %s%s", self.node_id, state.round,
                             self._config.run_id, " and sealed it" if record else "")
                else:
                    self._backend.wait(version, 1.0)  # sealed or moved on meanwhile: decide again
            elif isinstance(action, Seal):
                sealable_since = sealable_since if sealable_since is not None else now
                turn = _takeover_at(sealable_since, action.record.node_ids, self.node_id)
                if now < turn:
                    self._backend.wait(version, turn - now)
                    continue  # the round's first node seals; take over only if it does not
                if self._backend.seal(action.record):
                    log.info("rendezvous: sealed round %d of run %s with nodes %s", state.round,
                             self._config.run_id, ", ".join(action.record.node_ids))
                self._backend.wait(version, 1.0)
            elif isinstance(action, WaitAsSpare):
                if not waiting:
                    # Ask to be let in only once the running round's nodes answer: admitting
                    # a node they cannot reach would only interrupt them for nothing.
                    unanswered = self._unreachable_peers(state.sealed) if state.sealed else []
                    if unanswered:
                        if unanswered != cut_off:
                            log.info("rendezvous: node %s waits for %s to be reachable", self.node_id,
                                     ", ".join(unanswered))
                        cut_off = unanswered
                        self._backend.wait(version, 1.0)
                        continue
                    log.info("rendezvous: %s; node %s waits", action.reason, self.node_id)
                    self._backend.set_waiting(True)
                    waiting = True
                self._backend.wait(version, 1.0)
            elif isinstance(action, Wait):
                if len(state.members) < self._config.min_nodes and now >= deadline:
                    raise RendezvousTimeoutError(
                        f"only {len(state.members)} of at least {self._config.min_nodes} nodes joined "
                        f"run {self._config.run_id!r} within {self._config.rdzv.join_timeout:g}s")
                self._backend.wait(version, min(action.until, deadline) - now)

    # -- while a round runs ------------------------------------------------------------------

    def wait_for_change(self, timeout: float) -> bool:
        """Block until some key of the run changed (True) or `timeout` passed (False)."""
        return self._backend.wait(self._backend.version, timeout)

    def wake(self) -> None:
        self._backend.poke()

    def current_round(self) -> int:
        return self._backend.current_round()

    def closed(self) -> dict | None:
        return self._backend.closed()

    def ended_by_failure(self, round_: int) -> bool:
        """Whether round `round_` was ended because something failed (vs. a planned change)."""
        end = self._backend.round_end(round_)
        return bool(end and end["failure"])

    def restart_count(self) -> int:
        return self._backend.restarts()

    def sealed_members(self, round_: int) -> tuple[str, ...]:
        sealed = self._backend.sealed(round_)
        return sealed.node_ids if sealed else ()

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
        return gone if now >= _takeover_at(self._gone_seen[1], live, self.node_id) else []

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

    def blame(self, round_: int, when: float, window: float = 0.3) -> str:
        """Which node failed first in `round_`, this one having failed at time `when`.

        When one rank dies, its peers die too a moment later (their collectives break), and
        every agent sees a local failure. Each probes its peers, claims its failure time (and
        the peers it cannot reach) in etcd, waits `window` seconds (or until the round has
        moved on), and blames by `decide_blame`, so that failure counts and cooldowns land
        on the node that caused the failure. A node that found a peer unreachable waits for
        every member's claim (up to the probe timeout more): a partition is judged on all
        members' views.
        """
        sealed = self._backend.sealed(round_)
        if sealed is None or sealed.node_ids == (self.node_id,):
            return self.node_id  # alone in the round: no one else to blame, no need to wait
        self._prober.forget()  # probe afresh: the failure may be a peer cut off a moment ago
        cut_off = self._unreachable_peers(sealed)
        self._backend.claim_failure(round_, FailureClaim(when, tuple(cut_off)))
        if cut_off:
            window += self._config.rdzv.probe_timeout
        return self._judge(round_, sealed.node_ids, window, all_members=bool(cut_off))

    def _judge(self, round_: int, members: tuple[str, ...], window: float, *, all_members: bool) -> str:
        """Wait up to `window` for the members' failure claims (all of them, or just any more
        within the window), then decide whom to blame."""
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0 and self._backend.current_round() == round_:
            if all_members and set(members) <= set(self._backend.failure_claims(round_)):
                break
            self._backend.wait(self._backend.version, left)
        return decide_blame(members, self._backend.failure_claims(round_)) or self.node_id

    def _unreachable_peers(self, sealed: SealedRound) -> list[str]:
        """The peers this node checks (reachability.probe_targets) that it cannot reach. A peer
        whose registration is gone (it is bound to the lease: the peer was cut off from etcd
        too) counts as unreachable."""
        peers = probe_targets(sealed.node_ids, self.node_id)
        registered = self._backend.members(sealed.round, only=peers)  # the record names nodes only
        gone = [n for n in peers if n not in registered]
        return gone + self._prober.unreachable(_targets(peers, registered))

    def _expect_peers(self, state: RunState, chosen: list[str]) -> None:
        """While the round forms: have the peers this node would probe if it sealed as it
        stands verified in the background, so that the check once it seals is quick."""
        self._prober.expect(_targets(probe_targets(chosen, self.node_id), state.members))

    def _peers_reachable(self, round_: int) -> bool:
        """Before starting workers for a sealed round: can this node reach every peer? If not,
        it reports whom it cannot reach, the node cut off is judged (decide_blame) and the
        round ended with a failure against it, without spending a restart (no worker started
        yet). Its failure record puts it in cooldown, so it is left out once it fails again."""
        sealed = self._backend.sealed(round_)
        cut_off = self._unreachable_peers(sealed) if sealed is not None else []
        if not cut_off:
            return True
        log.warning("rendezvous: node %s cannot reach %s in round %d", self.node_id, ", ".join(cut_off), round_)
        self._backend.claim_failure(round_, FailureClaim(self._clock(), tuple(cut_off)))
        culprit = self._judge(round_, sealed.node_ids, self._config.rdzv.probe_timeout + 0.3, all_members=True)
        self.bump_round(round_, reason=f"node {culprit} is unreachable from its peers", failed_node=culprit,
                        restart=False)
        return False

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


def _targets(peers: list[str], registered: dict[str, Member]) -> Targets:
    """Where `peers` answer probes, from their registrations (those that have a listener)."""
    return {n: (registered[n].addr, registered[n].probe_port) for n in peers
            if n in registered and registered[n].probe_port}
