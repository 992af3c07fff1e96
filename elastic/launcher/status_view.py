"""What `elastic-run status` shows, as one JSON-ready dict (schema 1, documented in
docs/CLI.md): the run's state from its rendezvous keys joined with the nodes' status keys
(elastic/rendezvous/status_key.py). Pure: the read is elastic/launcher/status_cli.py's."""

from __future__ import annotations

from elastic.launcher.stragglers import find_stragglers
from elastic.rendezvous.settings import RendezvousSettings
from elastic.rendezvous.status_key import NodeStatus, RunStatus

SCHEMA = 1


def run_state(run: RunStatus) -> str:
    """forming, training, recovering or closed."""
    if run.closed is not None:
        return "closed"
    after_failure = run.round_end is not None and run.round_end.failure
    if run.sealed is not None and run.sealed_round == run.round and any(
            s.state == "training" and s.round == run.round for s in run.statuses.values()):
        return "training"
    return "recovering" if after_failure else "forming"


def build_view(run: RunStatus, settings: RendezvousSettings, straggler_factor: float, now: float) -> dict:
    """The status as plain data: what --json prints and what the tables show."""
    members = run.sealed.node_ids if run.sealed is not None else ()
    running = {n: s for n, s in run.statuses.items()
               if n in members and s.round == run.sealed_round and s.state == "training"}
    stragglers = find_stragglers(running, straggler_factor)
    names = sorted(set(members) | set(run.members) | run.alive | set(run.statuses) | set(run.nodes),
                   key=lambda n: (n not in members, members.index(n) if n in members else 0, n))
    nodes = [_node(n, run, settings, now, n in stragglers) for n in names]
    checkpoints = [s for s in run.statuses.values() if s.checkpoint_step is not None]
    newest = max(checkpoints, key=lambda s: s.checkpoint_step, default=None)
    in_memory = [s for s in run.statuses.values() if s.memory_checkpoint_step is not None]
    newest_memory = max(in_memory, key=lambda s: s.memory_checkpoint_step, default=None)
    goodputs = [s.goodput for s in run.statuses.values() if s.goodput is not None]
    max_restarts = max((s.max_restarts for s in run.statuses.values()), default=None)
    return {
        "schema": SCHEMA,
        "run_id": run.run_id,
        "state": run_state(run),
        "round": run.round,
        "sealed_round": run.sealed_round,
        "world_size": sum(run.sealed.nprocs) if run.sealed is not None else None,
        "num_nodes": len(members),
        "restarts": {"used": run.restarts, "max": max_restarts},
        "closed": {"ok": run.closed.ok, "reason": run.closed.reason} if run.closed is not None else None,
        "last_round_end": ({"failure": run.round_end.failure, "reason": run.round_end.reason}
                           if run.round_end is not None else None),
        "checkpoint": ({"step": newest.checkpoint_step, "at": newest.checkpoint_at} if newest is not None else None),
        "memory_checkpoint": ({"step": newest_memory.memory_checkpoint_step, "at": newest_memory.memory_checkpoint_at}
                              if newest_memory is not None else None),
        "goodput": round(sum(goodputs) / len(goodputs), 4) if goodputs else None,
        "stragglers": stragglers,
        "nodes": nodes,
        "read_at": now,
    }


def _node(name: str, run: RunStatus, settings: RendezvousSettings, now: float, straggler: bool) -> dict:
    status = run.statuses.get(name)
    record = run.nodes.get(name)
    members = run.sealed.node_ids if run.sealed is not None else ()
    registered = run.members.get(name)
    cooldown = record.cooldown_until(settings.cooldown_base, settings.cooldown_cap) if record else 0.0
    alive = name in run.alive
    if name in members:
        role = "member"
    elif registered is not None:
        role = "joining"  # registered for the round being formed
    elif alive:
        role = "spare"
    else:
        role = "gone"
    state = status.state if status is not None else ("joining" if alive else "gone")
    if not alive and state != "exited":
        state = "gone"  # its status key outlived it only if it exited cleanly
    return {
        "node": name, "role": role, "state": state, "alive": alive,
        "addr": registered.addr if registered is not None else None,
        "nproc": status.nproc if status is not None else (registered.nproc if registered else None),
        "pids": list(status.pids) if status is not None else [],
        "group_rank": members.index(name) if name in members else None,
        "round": status.round if status is not None else None,
        "step": _get(status, "step"), "steps_per_s": _get(status, "steps_per_s"),
        "busy_per_step": _get(status, "busy_per_step"), "straggler": straggler,
        "checkpoint_step": _get(status, "checkpoint_step"), "goodput": _get(status, "goodput"),
        "lost": dict(status.lost) if status is not None else {},
        "failures": record.failures if record is not None else 0,
        "cooldown_left": round(cooldown - now, 1) if cooldown > now else 0.0,
        "reason": status.reason if status is not None else "",
        "updated_at": _get(status, "updated_at"),
    }


def _get(status: NodeStatus | None, name: str):
    return getattr(status, name) if status is not None else None
