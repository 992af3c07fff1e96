"""The run's state as the protocol reads it: the mirrored keys (elastic/rendezvous/mirror.py)
decoded into records (elastic/rendezvous/protocol.py). The key layout is in
elastic/rendezvous/etcd_state.py."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from elastic.rendezvous.mirror import Mirror
from elastic.rendezvous.protocol import FailureClaim, JobClosed, Member, NodeRecord, RoundEnd, RunState, SealedRound


@functools.lru_cache(maxsize=64)
def _sealed(raw: bytes) -> SealedRound:
    """Parse a sealed record once (it never changes; every decision of the next round reads it)."""
    return SealedRound.from_json(raw)


class RunView(Mirror):
    """Reads of the run's state, all from the mirror: they cost no request."""

    def current_round(self) -> int:
        raw = self.keys.get("round")
        return int(raw) if raw is not None else 0

    def restarts(self) -> int:
        raw = self.keys.get("restarts")
        return int(raw) if raw is not None else 0

    def closed(self) -> JobClosed | None:
        raw = self.keys.get("closed")
        return JobClosed.from_json(raw) if raw is not None else None

    def sealed(self, round_: int) -> SealedRound | None:
        raw = self.keys.get(f"rounds/{round_}/sealed")
        return _sealed(raw) if raw is not None else None

    def round_end(self, round_: int) -> RoundEnd | None:
        raw = self.keys.get(f"rounds/{round_}/end")
        return RoundEnd.from_json(raw) if raw is not None else None

    def alive(self) -> set[str]:
        return self.keys.names("alive/")

    def finished(self, round_: int) -> set[str]:
        """Members of `round_` that finished or left on purpose (their absence is no failure)."""
        return set(self.keys.children(f"rounds/{round_}/done/")) | set(self.keys.children(f"rounds/{round_}/left/"))

    def members(self, round_: int, only: Iterable[str] | None = None) -> dict[str, Member]:
        """The nodes registered for `round_` (kept until round + 2 is sealed), or those of
        them named in `only`."""
        return self.keys.parsed(f"rounds/{round_}/members/", Member.from_json, only)

    def failure_claims(self, round_: int) -> dict[str, FailureClaim]:
        return {n: FailureClaim.from_json(v) for n, v in self.keys.children(f"rounds/{round_}/failed/").items()}

    def join_state(self) -> RunState:
        """The state a joining node decides on. Once the current round is sealed or the job
        closed, decide_join reads nothing else, so the per-member work is skipped: with N
        agents, all of them re-read the state on the seal's event."""
        round_ = self.current_round()
        closed, sealed = self.closed(), self.sealed(round_)
        if closed is not None or sealed is not None:
            return RunState(round=round_, closed=closed, sealed=sealed)
        return self.state()

    def state(self) -> RunState:
        """The protocol's view of the current round, from the mirror."""
        round_ = self.current_round()
        previous = self.sealed(round_ - 1) if round_ > 0 else None
        alive = self.alive()
        gone_on_purpose = self.finished(round_ - 1) if previous else set()
        previous_alive = frozenset(
            n for n in (previous.node_ids if previous else ()) if n in alive and n not in gone_on_purpose)
        return RunState(
            round=round_,
            closed=self.closed(),
            sealed=self.sealed(round_),
            members=self.members(round_),
            previous=previous,
            previous_alive=previous_alive,
            waiting=frozenset(self.keys.children("waiting/")),
            nodes={n: NodeRecord.from_json(v) for n, v in self.keys.children("nodes/").items()},
            restarts=self.restarts(),
        )
