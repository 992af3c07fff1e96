"""What ends a round, as this node sees it at one check of its workers and of the job's keys.

One look, in this order: the local workers' exits, a hung rank, this node's lease, the job
closed, the round moved on, a member node gone, nodes waiting to join (then this node bumps
the round itself). The agent looks every --monitor-interval and acts on the first answer
(elastic/launcher/agent.py).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass

from elastic.launcher.events import EventLog
from elastic.launcher.worker_group import WorkerExit, WorkerGroup
from elastic.rendezvous.handler import EtcdRendezvous


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROUND_CHANGED = "round changed"
    LEASE_LOST = "lease lost"
    CLOSED = "closed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Watched:
    """How a round ended, as this node saw it."""

    outcome: Outcome
    exits: list[WorkerExit]
    detail: str = ""
    failed_node: str | None = None
    step: int | None = None  # the failed rank's last completed step, if it reports progress
    at: float = dataclasses.field(default_factory=time.time)  # when we saw it (wall clock)


def check_round(group: WorkerGroup, round_: int, members: tuple[str, ...], rdzv: EtcdRendezvous,
                events: EventLog) -> Watched | None:
    """One look at the round (`members`: its sealed nodes); None while it goes on."""
    exits = group.poll()
    if exits is not None:
        if all(e.ok for e in exits):
            return Watched(Outcome.SUCCEEDED, exits)
        # Which rank failed first is decided after the group is stopped (see
        # Recovery.after_failure): a rank that raised may still be cleaning up.
        return Watched(Outcome.FAILED, exits, failed_node=rdzv.node_id, at=group.all_alive_at)
    group.progress.read()  # one read per check: hung() and the progress log use it
    hangs = group.progress.hung()
    if hangs:
        # A rank stuck in a collective looks the same from outside as the rank that
        # stopped it, so every quiet rank's stacks go into its log before the kill.
        for hang in hangs:
            group.dump_stacks(hang.rank)
        ranks = ",".join(str(h.rank) for h in hangs)
        return Watched(Outcome.FAILED, [], f"rank {ranks} hung: {hangs[0].reason}",
                       failed_node=rdzv.node_id, step=group.progress.steps().get(hangs[0].rank))
    if rdzv.lease_lost:
        return Watched(Outcome.LEASE_LOST, [], "this node's lease expired")
    closed = rdzv.closed()
    if closed is not None:
        return Watched(Outcome.CLOSED, [], closed.reason)
    if rdzv.current_round() != round_:
        return Watched(Outcome.ROUND_CHANGED, [], "the job moved to a new round")
    gone = rdzv.departed_members(round_, members)
    if gone:
        return Watched(Outcome.FAILED, [], f"node {gone[0]} is gone", failed_node=gone[0])
    if rdzv.should_grow(round_):
        rdzv.bump_round(round_, reason="nodes are waiting to join")
        events.emit("growing", round=round_)
        return Watched(Outcome.ROUND_CHANGED, [], "growing: nodes are waiting to join")
    return None
