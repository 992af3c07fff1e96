"""The rendezvous protocol as pure decisions: a snapshot of the run's state in, one action out.

Nothing here talks to etcd or reads a clock: `decide_join` and `decide_growth` are functions
of (state, this node, settings, now), so every rule can be tested from a table. The executor
in `elastic/rendezvous/handler.py` reads the state from etcd, asks for a decision, and applies it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from elastic.exchange.codec import Record


@dataclass(frozen=True)
class Assignment:
    """This node's place in a sealed round: what its workers need to form the process group."""

    round: int
    group_rank: int  # this node's index among the round's members
    num_nodes: int
    world_size: int
    rank_offset: int  # global rank of this node's local rank 0
    master_addr: str
    master_port: int
    restart_count: int
    local_addr: str = ""  # the address this node registered (set by the rendezvous, not in the record)


# -- records stored in etcd (JSON) -------------------------------------------------------------


@dataclass(frozen=True)
class Member(Record):
    """A node as it registers for a round."""

    node_id: str
    addr: str
    port: int  # a port this node reserved for the torch.distributed store, used if it is rank 0
    nproc: int
    probe_port: int = 0  # where its agent answers reachability probes (rendezvous/reachability.py); 0: none
    replica_port: int = 0  # where its agent serves its memory checkpoints (launcher/replica_server.py); 0: none


@dataclass(frozen=True)
class SealedRound:
    """The fixed outcome of a round: ordered members (hence ranks), their process counts and
    the master address. Only what a rank needs: every agent receives the record by watch, so
    with 1,024 nodes its size is paid 1,024 times (node ids only: about 9 bytes a node), which
    is why it has a compact encoding of its own instead of the generic one (exchange/codec.py);
    like it, decoding ignores keys it does not know."""

    round: int
    node_ids: tuple[str, ...]
    nprocs: tuple[int, ...]
    master_addr: str
    master_port: int
    restart_count: int

    @classmethod
    def of(cls, round_: int, members: Sequence[Member], restart_count: int) -> SealedRound:
        """The record of `members` in rank order; the first one hosts the master."""
        first = members[0]
        return cls(round_, tuple([m.node_id for m in members]), tuple([m.nproc for m in members]),
                   first.addr, first.port, restart_count)

    def to_json(self) -> str:
        uniform = len(set(self.nprocs)) == 1
        return json.dumps({"round": self.round, "restart_count": self.restart_count,
                           "master": [self.master_addr, self.master_port], "nodes": list(self.node_ids),
                           "nproc": self.nprocs[0] if uniform else list(self.nprocs)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> SealedRound:
        data = json.loads(raw)
        nodes = tuple(data["nodes"])
        nproc = data["nproc"]
        nprocs = tuple(nproc) if isinstance(nproc, list) else (nproc,) * len(nodes)
        addr, port = data["master"]
        return cls(data["round"], nodes, nprocs, addr, port, data["restart_count"])

    def assignment_for(self, node_id: str) -> Assignment | None:
        if node_id not in self.node_ids:
            return None
        index = self.node_ids.index(node_id)
        return Assignment(
            round=self.round, group_rank=index, num_nodes=len(self.node_ids),
            world_size=sum(self.nprocs), rank_offset=sum(self.nprocs[:index]),
            master_addr=self.master_addr, master_port=self.master_port,
            restart_count=self.restart_count,
        )


@dataclass(frozen=True)
class NodeRecord(Record):
    """Failures of one node, kept in etcd so they survive agent restarts."""

    failures: int = 0
    last_failure: float = 0.0  # wall-clock seconds

    def cooldown_until(self, base: float, cap: float) -> float:
        """Exponential cooldown: base * 2^(failures-2) after the second failure, capped.

        The first failure costs nothing (a single crash is what restarts are for); a node
        that keeps failing waits 1x, 2x, 4x... `base` before it is admitted again.
        """
        if self.failures < 2:
            return 0.0
        return self.last_failure + min(cap, base * 2 ** (self.failures - 2))


@dataclass(frozen=True)
class FailureClaim(Record):
    """A node's report that round r failed for it: when, and which peers it could not reach."""

    at: float  # wall-clock seconds
    unreachable: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundEnd(Record):
    """Why a round was ended (rounds/<r>/end): a failure, or a planned change."""

    failure: bool
    reason: str


@dataclass(frozen=True)
class JobClosed(Record):
    """The job is over (the `closed` key): nobody joins again. The first reason wins."""

    ok: bool = False
    reason: str = "closed"


# -- the snapshot the decisions read -----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    min_nodes: int
    max_nodes: int
    last_call_timeout: float
    world_size_multiple: int = 1
    cooldown_base: float = 10.0
    cooldown_cap: float = 600.0
    # How long live members of the previous round are awaited before the round seals without
    # them (they are stopping their workers; an agent that neither comes back nor loses its
    # lease is wedged). The last-call window is only for newcomers.
    rejoin_timeout: float = 600.0


@dataclass(frozen=True)
class RunState:
    """Everything under /<prefix>/<run_id>/ that the protocol looks at, read in one request."""

    round: int = 0
    closed: JobClosed | None = None
    sealed: SealedRound | None = None  # of `round`
    members: dict[str, Member] = field(default_factory=dict)  # registered for `round`
    previous: SealedRound | None = None  # sealed record of round - 1
    previous_alive: frozenset[str] = frozenset()  # members of round-1 whose lease lives and who did not leave
    waiting: frozenset[str] = frozenset()  # nodes waiting to get into a running round
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    restarts: int = 0  # failure restarts the job has used


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    until: float  # re-decide at this time at the latest (or earlier, when etcd changes)


@dataclass(frozen=True)
class Seal:
    record: SealedRound


@dataclass(frozen=True)
class Joined:
    assignment: Assignment


@dataclass(frozen=True)
class Register:
    """Register this node as a member of the current round."""


@dataclass(frozen=True)
class WaitAsSpare:
    """The round runs without this node: register as waiting and wait for the next round."""

    reason: str


@dataclass(frozen=True)
class Closed:
    reason: str
    ok: bool = False


Action = Wait | Seal | Joined | Register | WaitAsSpare | Closed


# When a round can be sealed (or a member is gone), every agent sees it by the same watch
# event. Only one agent acts at once: the first node of the record to seal (or the first live
# member of the running round); the k-th in that order acts only if nothing happened for k
# times this long (the ones before it may have died, their leases not yet expired). Without
# this, all N agents send the same compare-and-swap and N-1 of them fail; with one common
# delay, they all do so at once whenever the first one is slower than the delay.
TAKEOVER_DELAY = 1.0


def takeover_at(since: float, order: tuple[str, ...], node: str) -> float:
    """When `node` acts on something first seen at `since`, if nobody before it in `order` has."""
    place = order.index(node) if node in order else len(order)
    return since + place * TAKEOVER_DELAY


def admissible(state: RunState, settings: Settings, now: float) -> list[str]:
    """Registered members that may enter the round, in rank order.

    Survivors of the previous round keep their relative order (stable ranks); newcomers
    follow by node id. Nodes in failure cooldown are left out when MIN is met without them;
    the list is cut to MAX and to a multiple of `world_size_multiple`.
    """
    present = state.members.keys()
    survivors = [n for n in (state.previous.node_ids if state.previous else ()) if n in present]
    kept = set(survivors)  # not the list: with 1,024 survivors that test would cost N^2
    order = survivors + sorted([n for n in present if n not in kept])
    cooled = [n for n in order if _cooled(state, n, settings, now)] if state.nodes else order
    # A cooling node is kept out only while the job can run without it: stalling a job
    # that needs the node (MIN, or a single node) would turn a cooldown into an outage.
    if len(cooled) >= settings.min_nodes:
        order = cooled
    return order[:_allowed_size(len(order), settings)]


def _cooled(state: RunState, node: str, settings: Settings, now: float) -> bool:
    record = state.nodes.get(node)
    return record is None or now >= record.cooldown_until(settings.cooldown_base, settings.cooldown_cap)


def decide_join(state: RunState, node: str, settings: Settings, now: float,
                min_reached_at: float | None) -> Action:
    """What a node that wants to run in round `state.round` should do next.

    Seal at once when every live member of the previous round is back or MAX have joined;
    else, once MIN are admissible, wait for the live members of the previous round that have
    not registered yet (up to the rejoin timeout), or else the last-call window for
    newcomers, then seal.
    """
    if state.closed is not None:
        return Closed(state.closed.reason, state.closed.ok)
    if state.sealed is not None:
        assignment = state.sealed.assignment_for(node)
        if assignment is not None:
            return Joined(assignment)
        return WaitAsSpare(f"round {state.round} is sealed without node {node}")
    if node not in state.members:
        return Register()
    chosen = admissible(state, settings, now)
    if node not in chosen and len(chosen) >= settings.max_nodes:
        return WaitAsSpare(f"round {state.round} is full ({settings.max_nodes} nodes)")
    if len(chosen) < settings.min_nodes:
        return Wait(until=_next_cooldown_end(state, settings, now))
    everyone_back = bool(state.previous_alive) and state.previous_alive <= set(chosen)
    if len(chosen) >= settings.max_nodes or everyone_back:
        return Seal(_record(state, chosen))
    # A survivor that is slower than the last call to stop its workers must not be left out:
    # it would come back as a spare and cost the job a second restart to grow again.
    survivors_missing = not state.previous_alive <= state.members.keys()
    window = settings.rejoin_timeout if survivors_missing else settings.last_call_timeout
    deadline = (min_reached_at if min_reached_at is not None else now) + window
    if now >= deadline:
        return Seal(_record(state, chosen))
    return Wait(until=deadline)


def completing_record(state: RunState, member: Member, settings: Settings, now: float,
                      min_reached_at: float | None) -> SealedRound | None:
    """The record to seal along with `member`'s registration, when its arrival completes the
    round at once (MAX reached, or the last live member of the previous round is back).

    The arriving node decides what every member would decide on seeing its registration,
    and writes both in one transaction: the round seals one watch round-trip earlier, and
    N agents re-deciding on the registration event do not delay it.
    """
    arrived = dataclasses.replace(state, members={**state.members, member.node_id: member})
    action = decide_join(arrived, member.node_id, settings, now, min_reached_at)
    return action.record if isinstance(action, Seal) else None


def _record(state: RunState, chosen: list[str]) -> SealedRound:
    return SealedRound.of(state.round, [state.members[n] for n in chosen], state.restarts)


def _next_cooldown_end(state: RunState, settings: Settings, now: float) -> float:
    ends = [r.cooldown_until(settings.cooldown_base, settings.cooldown_cap) for n, r in state.nodes.items()
            if n in state.members]
    future = [t for t in ends if t > now]
    return min(future) if future else float("inf")


def decide_growth(state: RunState, running: SealedRound, settings: Settings, now: float,
                  first_seen: float | None) -> bool:
    """While a round runs: should it be ended so that waiting nodes can join?

    Yes once a waiting node would be admitted (room below MAX, allowed world size, not in
    cooldown) and the arrivals have been debounced for the last-call window.
    """
    if not state.waiting or first_seen is None or now - first_seen < settings.last_call_timeout:
        return False
    candidates = [n for n in sorted(state.waiting) if n not in running.node_ids
                  and _cooled(state, n, settings, now)]
    return _allowed_size(len(running.node_ids) + len(candidates), settings) > len(running.node_ids)


def decide_blame(members: tuple[str, ...], claims: dict[str, FailureClaim]) -> str | None:
    """Which member of a failed round to blame, from the members' failure claims.

    When some member could not reach another, the network failed, and the node with the most
    broken links (reported from either end) is the one cut off: in an asymmetric partition
    the others all report it and it reports them all. Ties go to the later member, so that
    the first ones (rank 0, the store's host) stay. Otherwise the earliest claim is blamed:
    when one rank dies, its peers die a moment later of the broken collective.
    """
    claims = {n: c for n, c in claims.items() if n in members}
    broken = {n: 0 for n in members}
    for node, claim in claims.items():
        for peer in claim.unreachable:
            if peer in broken and peer != node:
                broken[node] += 1
                broken[peer] += 1
    if any(broken.values()):
        return max(reversed(members), key=lambda n: broken[n])
    if not claims:
        return None
    return min(claims, key=lambda n: (claims[n].at, n))


def _allowed_size(available: int, settings: Settings) -> int:
    """How many of `available` nodes a round may take: at most MAX, a multiple of M."""
    size = min(available, settings.max_nodes)
    return size - size % settings.world_size_multiple
