"""The rendezvous handler the agent uses: join rounds, watch the job, report failures.

It runs the loop "sync, decide, apply": the etcd backend keeps a mirror of the run's keys
(elastic/rendezvous/etcd_state.py), the pure protocol decides (elastic/rendezvous/protocol.py),
and only the handler turns decisions into writes: this module while joining a round,
elastic/rendezvous/running_round.py while a round runs. The lease is kept alive by a
background thread (elastic/rendezvous/lease.py); if etcd tells it the lease expired (this
node was cut off longer than the TTL), `lease_lost` is set and the agent stops its workers
and joins again with a new lease. Whom a failure is blamed on is judged in
elastic/rendezvous/blame.py.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from elastic.errors import ConfigError, RendezvousClosedError, RendezvousTimeoutError
from elastic.rendezvous.blame import FailureBlame
from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.lease import LeaseKeeper
from elastic.rendezvous.protocol import (
    Assignment,
    Closed,
    Joined,
    Member,
    Register,
    Seal,
    Wait,
    WaitAsSpare,
    admissible,
    completing_record,
    decide_join,
    takeover_at,
)
from elastic.rendezvous.reachability import Prober, ProbeListener
from elastic.rendezvous.running_round import RunningRound
from elastic.rendezvous.settings import RendezvousJob

log = logging.getLogger(__name__)


class EtcdRendezvous(RunningRound):
    """One agent's handle on the job's rendezvous. Call order: start, join, (watch...), shutdown.
    This class joins rounds; the calls made while a round runs are RunningRound's."""

    def __init__(self, backend: EtcdBackend, config: RendezvousJob, addr: str,
                 pick_port: Callable[[], int], clock: Callable[[], float] = time.time) -> None:
        super().__init__(backend, config, clock)
        self._addr = addr
        self._pick_port = pick_port
        self._stop = threading.Event()  # set by shutdown(): the lease's keep-alive ends
        self._lease = LeaseKeeper(backend, config.rdzv.lease_ttl, self._stop)
        self._probe: ProbeListener | None = None
        self._prober = Prober(config.rdzv.probe_timeout, fresh_for=config.rdzv.lease_ttl)
        self._blame = FailureBlame(backend, self._prober, config.rdzv.probe_timeout, clock)
        self.should_abort: Callable[[], None] = lambda: None  # raises to abort a wait (signals)
        self.replica_port = 0  # registered with this node: where its agent serves its memory checkpoints

    @property
    def addr(self) -> str:
        """The address this node registers (peers reach it there)."""
        return self._addr

    def replica_token(self) -> str:
        """The run's shared secret for the agents' memory-checkpoint replication (after start())."""
        return self._backend.shared_secret("replica_token")

    @property
    def lease_lost(self) -> bool:
        return self._lease.lost

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take a lease, announce this agent, and start mirroring the run's keys."""
        if self._probe is None:
            self._probe = ProbeListener(self._addr)
        self._prober.forget()  # a restart after a lost lease: this node may have been cut off
        self._lease.take()
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
        if self._lease.expired():
            log.warning("rendezvous: node %s's lease had expired; taking a new one", self.node_id)
            self.renew()

    def shutdown(self) -> None:
        self._stop.set()
        self._prober.close()
        if self._probe is not None:
            self._probe.close()
        self._backend.shutdown()

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
                self._blame.expect_peers(state, chosen)
            if isinstance(action, Joined):
                self._prober.expect({})
                if not self._peers_reachable(action.assignment.round):
                    continue  # the round was ended; join the next one
                if waiting:
                    self._backend.set_waiting(False)
                self._growth_seen = None  # waiting nodes seen before are judged afresh in this round
                return dataclasses.replace(action.assignment, local_addr=self._addr)
            if isinstance(action, Register):
                member = Member(self.node_id, self._addr, self._pick_port(), self._config.nproc_per_node,
                                self._probe.port, self.replica_port)
                record = completing_record(state, member, self._settings, now, min_reached_at)
                if self._backend.register(state.round, member, seal=record):
                    log.info("rendezvous: node %s joined round %d of run %s%s", self.node_id, state.round,
                             self._config.run_id, " and sealed it" if record else "")
                else:
                    self._backend.wait(version, 1.0)  # sealed or moved on meanwhile: decide again
            elif isinstance(action, Seal):
                sealable_since = sealable_since if sealable_since is not None else now
                turn = takeover_at(sealable_since, action.record.node_ids, self.node_id)
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
                    unanswered = self._blame.unreachable_peers(state.sealed) if state.sealed else []
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

    # -- failures ----------------------------------------------------------------------------

    def blame(self, round_: int, when: float, window: float = 0.3) -> str:
        """Which node failed first in `round_`, this one having failed at time `when`: it
        claims its failure and waits `window` seconds for its peers' (elastic/rendezvous/blame.py)."""
        return self._blame.after_failure(round_, when, window)

    def _peers_reachable(self, round_: int) -> bool:
        """Before starting workers for a sealed round: can this node reach every peer? If not,
        the round is ended with a failure against the node judged cut off, without spending a
        restart (no worker started yet). Its failure record puts it in cooldown, so it is left
        out once it fails again."""
        culprit = self._blame.cut_off_culprit(round_)
        if culprit is None:
            return True
        self.bump_round(round_, reason=f"node {culprit} is unreachable from its peers", failed_node=culprit,
                        restart=False)
        return False
