"""Whom a failed round is blamed on: this node's failure claim, its peers', and probes.

When one rank dies, its peers die too a moment later (their collectives break), and every
agent sees a local failure. Each probes its peers, claims its failure time (and the peers it
cannot reach) in etcd (rounds/<r>/failed/<node>), waits a short window (or until the round
has moved on), and blames by `decide_blame` (elastic/rendezvous/protocol.py), so that failure
counts and cooldowns land on the node that caused the failure. A node that found a peer
unreachable waits for every member's claim (up to the probe timeout more): a partition is
judged on all members' views. The same judgement runs before workers start, when a node of
a sealed round cannot reach some of its peers (elastic/rendezvous/reachability.py probes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.protocol import FailureClaim, Member, RunState, SealedRound, decide_blame
from elastic.rendezvous.reachability import Prober, Targets, probe_targets

log = logging.getLogger(__name__)


class FailureBlame:
    """This node's failure claims, and its verdict on the claims of its round's members."""

    def __init__(self, backend: EtcdBackend, prober: Prober, probe_timeout: float,
                 clock: Callable[[], float]) -> None:
        self._backend = backend
        self._prober = prober
        self._probe_timeout = probe_timeout
        self._clock = clock

    @property
    def node_id(self) -> str:
        return self._backend.node_id

    def after_failure(self, round_: int, when: float, window: float) -> str:
        """Which node failed first in `round_`, this one having failed at time `when`: claim,
        wait `window` seconds for the others' claims, judge."""
        sealed = self._backend.sealed(round_)
        if sealed is None or sealed.node_ids == (self.node_id,):
            return self.node_id  # alone in the round: no one else to blame, no need to wait
        self._prober.forget()  # probe afresh: the failure may be a peer cut off a moment ago
        cut_off = self.unreachable_peers(sealed)
        self._backend.claim_failure(round_, FailureClaim(when, tuple(cut_off)))
        if cut_off:
            window += self._probe_timeout
        return self._judge(round_, sealed.node_ids, window, all_members=bool(cut_off))

    def cut_off_culprit(self, round_: int) -> str | None:
        """Before starting workers for a sealed round: None if this node reaches every peer it
        checks; else it reports whom it cannot reach, and the node judged cut off is returned."""
        sealed = self._backend.sealed(round_)
        cut_off = self.unreachable_peers(sealed) if sealed is not None else []
        if not cut_off:
            return None
        log.warning("rendezvous: node %s cannot reach %s in round %d", self.node_id, ", ".join(cut_off), round_)
        self._backend.claim_failure(round_, FailureClaim(self._clock(), tuple(cut_off)))
        return self._judge(round_, sealed.node_ids, self._probe_timeout + 0.3, all_members=True)

    def _judge(self, round_: int, members: tuple[str, ...], window: float, *, all_members: bool) -> str:
        """Wait up to `window` for the members' failure claims (all of them, or just any more
        within the window), then decide whom to blame."""
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0 and self._backend.current_round() == round_:
            if all_members and set(members) <= set(self._backend.failure_claims(round_)):
                break
            self._backend.wait(self._backend.version, left)
        return decide_blame(members, self._backend.failure_claims(round_)) or self.node_id

    def unreachable_peers(self, sealed: SealedRound) -> list[str]:
        """The peers this node checks (reachability.probe_targets) that it cannot reach. A peer
        whose registration is gone (it is bound to the lease: the peer was cut off from etcd
        too) counts as unreachable."""
        peers = probe_targets(sealed.node_ids, self.node_id)
        registered = self._backend.members(sealed.round, only=peers)  # the record names nodes only
        gone = [n for n in peers if n not in registered]
        return gone + self._prober.unreachable(_targets(peers, registered))

    def expect_peers(self, state: RunState, chosen: list[str]) -> None:
        """While the round forms: have the peers this node would probe if it sealed as it
        stands verified in the background, so that the check once it seals is quick."""
        self._prober.expect(_targets(probe_targets(chosen, self.node_id), state.members))


def _targets(peers: list[str], registered: dict[str, Member]) -> Targets:
    """Where `peers` answer probes, from their registrations (those that have a listener)."""
    return {n: (registered[n].addr, registered[n].probe_port) for n in peers
            if n in registered and registered[n].probe_port}
