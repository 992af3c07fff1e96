"""This node's live status: kept from the agent's events and its checks of its workers,
written to the node's status key (elastic/rendezvous/status_key.py) by a background thread
when it changed and at most once a second (so an etcd outage never holds the agent's loop),
and served as Prometheus metrics with `--metrics-port` (elastic/launcher/metrics.py).

The same thread judges stragglers on the first node of the running round
(elastic/launcher/stragglers.py); with `--exclude-stragglers` it ends the round with a
failure against a node that stayed a straggler for the window, as if it had failed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict

from elastic.errors import ConfigError
from elastic.launcher.config import LaunchConfig
from elastic.launcher.events import EventLog
from elastic.launcher.rank_rates import RankRates
from elastic.launcher.stragglers import JUDGE_EVERY, StragglerJudge
from elastic.launcher.worker_group import WorkerGroup
from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR
from elastic.rendezvous.handler import EtcdRendezvous
from elastic.rendezvous.status_key import NodeStatus

log = logging.getLogger(__name__)

PUBLISH_EVERY = 1.0  # seconds: at most one status write per node per second

# The node's state after each event (events not named leave it as it is).
_STATES = {"round_sealed": "starting", "workers_started": "training", "workers_reconfigured": "training",
           "progress": "training", "failure": "recovering", "restart": "recovering", "lease_lost": "recovering",
           "node_bad": "recovering", "round_left": "rejoining", "growing": "rejoining", "left": "stopping",
           "interrupted": "stopping", "succeeded": "stopping", "job_end": "exited"}


class StatusPublisher:
    """Owns this node's NodeStatus; the agent feeds it events (a listener) and ticks."""

    def __init__(self, config: LaunchConfig, rdzv: EtcdRendezvous, events: EventLog) -> None:
        self._config = config
        self._rdzv = rdzv
        self._events = events
        self._lock = threading.Lock()
        self._status = NodeStatus(node=rdzv.node_id, state="joining", updated_at=time.time(),
                                  nproc=config.nproc_per_node, max_restarts=config.max_restarts)
        self._rates = RankRates()
        self._completed_at: OrderedDict[int, float] = OrderedDict()  # recent step -> wall time it completed
        self._judge = StragglerJudge(config.straggler_factor, config.straggler_window if config.exclude_stragglers
                                     else None, events.emit)
        self._metrics = None
        if config.metrics_port is not None:
            # prometheus_client is imported only when asked for
            from elastic.launcher.metrics import Metrics

            try:
                self._metrics = Metrics(config.metrics_port, run_id=config.run_id, node=rdzv.node_id)
            except OSError as exc:
                raise ConfigError(f"--metrics-port {config.metrics_port}: cannot serve metrics there "
                                  f"({exc.strerror}): pick a free port") from None
            self._metrics.max_restarts.set(config.max_restarts)
        self._joined = False  # nothing is published before the first round (no lease yet)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="status-publisher", daemon=True)
        events.listeners.append(self.on_event)
        self._thread.start()

    # -- fed by the agent's thread -------------------------------------------------------------

    def on_event(self, event: dict) -> None:
        kind = event["event"]
        changes: dict[str, object] = {}
        if kind in _STATES:
            changes["state"] = _STATES[kind]
            self._joined = True  # a round was sealed: the lease exists, so the key can be on it
        if kind == "round_sealed":
            changes.update(round=event["round"], group_rank=event["group_rank"], restarts=event["restarts"],
                           steps_per_s=None, busy_per_step=None)
            self._rates = RankRates()
        elif kind in ("workers_started", "workers_reconfigured"):
            changes["pids"] = tuple(event["pids"])
        elif kind == "progress":
            changes["step"] = event["step"]
        elif kind == "checkpoint_committed" and event.get("tier") == "memory":
            changes.update(memory_checkpoint_step=event["step"], memory_checkpoint_at=event["time"])
        elif kind == "checkpoint_committed":
            changes.update(checkpoint_step=event["step"], checkpoint_at=event["time"])
        elif kind == "job_end":
            changes["reason"] = event["reason"]
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)
        if self._metrics is not None:
            self._observe(kind, event)

    def _observe(self, kind: str, event: dict) -> None:
        m = self._metrics
        if kind == "round_sealed":
            m.round.set(event["round"])
            m.world_size.set(event["world_size"])
            m.restarts.set(event["restarts"])
        elif kind == "progress":
            m.step.set(event["step"])
        elif kind in ("failure", "straggler_excluded"):
            m.failure(event)
        elif kind == "checkpoint_committed":
            (m.memory_checkpoint_step if event.get("tier") == "memory" else m.checkpoint_step).set(event["step"])
            m.save_stall.observe(event["stall"])
            # When the step completed, to within one check of the workers (the newest seen at or before it).
            completed = next((at for step, at in reversed(self._completed_at.items()) if step <= event["step"]), None)
            if completed is not None:
                m.commit_latency.observe(max(0.0, event["time"] - completed))

    def tick(self, group: WorkerGroup) -> None:
        """After a check of the workers (their progress records just read): sample their pace."""
        steps = group.progress.steps()
        pids = dict(zip(sorted(steps), group.pids)) if len(steps) == len(group.pids) else {}
        per_step = self._rates.sample(steps, pids)
        slowest = group.progress.slowest()
        if slowest is not None and slowest.step not in self._completed_at:
            self._completed_at[slowest.step] = slowest.changed_at
            if len(self._completed_at) > 256:
                self._completed_at.popitem(last=False)
        pace = self._rates.pace()
        if pace is not None:
            with self._lock:
                self._status = dataclasses.replace(self._status, steps_per_s=round(pace.steps_per_s, 3),
                                                   busy_per_step=_rounded(pace.busy_per_step))
        if self._metrics is not None:
            for seconds in per_step:
                self._metrics.step_seconds.observe(seconds)
            if pace is not None:
                self._metrics.steps_per_s.set(pace.steps_per_s)
                self._metrics.busy_per_step.set(pace.busy_per_step or 0.0)

    def close(self) -> None:
        """Stop publishing; leave the last status in etcd off the lease (the job's record)."""
        self._stop.set()
        self._thread.join()
        if self._metrics is not None:
            self._metrics.close()
        if not self._joined:
            return
        try:
            self._rdzv.publish_status(self._current(), on_lease=False)
        except ANY_ETCD_ERROR as exc:
            log.info("status: the last status was not written (%s)", type(exc).__name__)

    # -- the publishing thread -----------------------------------------------------------------

    def _current(self) -> NodeStatus:
        goodput = self._events.goodput()
        with self._lock:
            self._status = dataclasses.replace(
                self._status, goodput=round(goodput.ratio, 4), lost={k: round(v, 1) for k, v in goodput.lost.items()})
            status = self._status
        if self._metrics is not None:
            self._metrics.account(goodput)
        return status

    def _publish_loop(self) -> None:
        written: NodeStatus | None = None
        judged = 0.0
        while not self._stop.wait(PUBLISH_EVERY):
            if not self._joined:
                continue
            status = self._current()
            try:
                if status != written:
                    self._rdzv.publish_status(dataclasses.replace(status, updated_at=round(time.time(), 3)))
                    written = status
                if status.group_rank == 0 and status.state == "training" and time.monotonic() - judged >= JUDGE_EVERY:
                    judged = time.monotonic()
                    self.judge_stragglers(status.round)
            except ANY_ETCD_ERROR as exc:  # etcd away: the rendezvous deals with it; try again later
                log.info("status: not published (%s)", type(exc).__name__)

    def judge_stragglers(self, round_: int) -> None:
        """Flag the stragglers of `round_`; with --exclude-stragglers, end the round against one
        that stayed slow for the window."""
        if self._config.straggler_factor <= 0:
            return
        exclude = self._judge.judge(self._rdzv.peer_statuses(), round_)
        if exclude is not None:
            reason = (f"node {exclude} is a straggler: slower than the others by more than "
                      f"{self._config.straggler_factor:g}x for {self._config.straggler_window:g}s")
            self._rdzv.bump_round(round_, reason=reason, failed_node=exclude)
            self._events.emit("straggler_excluded", round=round_, straggler=exclude, reason=reason)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
