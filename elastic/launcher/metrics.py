"""The agent's Prometheus endpoint (`elastic-run --metrics-port PORT`), one per node.

The same numbers as the node's status key and the events log: fed from the events the
agent emits (elastic/launcher/events.py) and from its pace at each check of its workers
(elastic/launcher/status_publisher.py). Every series carries `run_id` and `node` labels. A
dashboard for them: deploy/grafana/.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from elastic.launcher.goodput import Goodput

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SAVE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)


def failure_cause(event: dict) -> str:
    """A failure event's cause, for the failures counter's `cause` label."""
    reason = str(event.get("reason", ""))
    if event.get("returncode") is not None:
        return "worker_exit"
    if " hung" in reason:
        return "hang"
    if "is gone" in reason:
        return "node_lost"
    if "straggler" in reason:
        return "straggler"
    return "other"


class Metrics:
    """The series of one agent, served over HTTP on `port` (all interfaces) until close()."""

    def __init__(self, port: int, *, run_id: str, node: str) -> None:
        self.registry = CollectorRegistry()
        labels = ("run_id", "node")
        self._labels = {"run_id": run_id, "node": node}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(**self._labels)

        self.step = gauge("elastic_step", "Last completed optimizer step (slowest local rank)")
        self.steps_per_s = gauge("elastic_steps_per_second", "Steps per second over the last few seconds")
        self.busy_per_step = gauge("elastic_busy_seconds_per_step",
                                   "CPU + run-queue seconds per step of the busiest local rank (stragglers)")
        self.world_size = gauge("elastic_world_size", "Ranks in the round this node runs")
        self.round = gauge("elastic_round", "The sealed round this node's workers run in")
        self.restarts = gauge("elastic_restarts", "Job-wide restarts used")
        self.max_restarts = gauge("elastic_max_restarts", "The job's restart budget (--max-restarts)")
        self.checkpoint_step = gauge("elastic_checkpoint_step", "Newest durable checkpoint step committed")
        self.memory_checkpoint_step = gauge("elastic_memory_checkpoint_step",
                                            "Newest checkpoint step committed to the node's memory tier")
        self.goodput = gauge("elastic_goodput_ratio", "Useful (stepping) time over wall time, this node so far")
        self._lost = Gauge("elastic_lost_seconds", "Seconds lost, by cause (goodput)", (*labels, "cause"),
                           registry=self.registry)
        self._failures = Counter("elastic_failures", "Failures seen by this node, by cause", (*labels, "cause"),
                                 registry=self.registry)
        self.step_seconds = Histogram("elastic_step_seconds", "Wall seconds per step", labels,
                                      buckets=_STEP_BUCKETS, registry=self.registry).labels(**self._labels)
        self.save_stall = Histogram("elastic_checkpoint_save_stall_seconds", "Seconds a save held training",
                                    labels, buckets=_SAVE_BUCKETS, registry=self.registry).labels(**self._labels)
        self.commit_latency = Histogram(
            "elastic_checkpoint_commit_latency_seconds", "Seconds from a step's completion to its checkpoint's "
            "commit", labels, buckets=_SAVE_BUCKETS, registry=self.registry).labels(**self._labels)
        self._server, self._thread = start_http_server(port, registry=self.registry)

    @property
    def port(self) -> int:
        return self._server.server_port

    def failure(self, event: dict) -> None:
        self._failures.labels(**self._labels, cause=failure_cause(event)).inc()

    def account(self, goodput: Goodput) -> None:
        self.goodput.set(goodput.ratio)
        for cause, seconds in goodput.lost.items():
            self._lost.labels(**self._labels, cause=cause).set(seconds)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
