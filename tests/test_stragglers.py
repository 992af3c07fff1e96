"""Straggler rules: busy seconds per step against the other nodes' median; what the judging
agent does about a straggler (the end-to-end flag, on a real job, is in tests/test_status.py)."""

from __future__ import annotations

import os
import threading
import time

from elastic.host.busy_time import busy_seconds
from elastic.launcher.config import LaunchConfig
from elastic.launcher.events import EventLog
from elastic.launcher.status_publisher import StatusPublisher
from elastic.launcher.stragglers import StragglerJudge, find_stragglers
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.handler import EtcdRendezvous
from elastic.rendezvous.status_key import NodeStatus, read_run
from helpers import wait_until


def node(name: str, busy: float | None, steps_per_s: float | None = 10.0, round_: int = 0) -> NodeStatus:
    return NodeStatus(node=name, state="training", updated_at=0.0, round=round_, busy_per_step=busy,
                      steps_per_s=steps_per_s)


def test_a_node_busy_for_its_whole_step_while_the_others_wait_is_flagged():
    nodes = {n.node: n for n in [node("a", 0.01), node("b", 0.09), node("c", 0.012), node("d", 0.011)]}
    assert find_stragglers(nodes, factor=2) == ["b"]
    assert find_stragglers(nodes, factor=10) == []  # 0.09 is not > 10 x 0.011
    assert find_stragglers(nodes, factor=0) == []  # judging is off


def test_slower_than_the_others_but_mostly_waiting_is_no_straggler():
    # b is 5x busier than a but busy for 20 ms of a 100 ms step: the job does not wait for it.
    nodes = {"a": node("a", 0.004), "b": node("b", 0.02)}
    assert find_stragglers(nodes, factor=2) == []


def test_nodes_without_a_pace_yet_are_not_judged():
    nodes = {"a": node("a", 0.01), "b": node("b", None), "c": node("c", 0.09, steps_per_s=None)}
    assert find_stragglers(nodes, factor=2) == []


def test_the_judge_logs_once_per_stretch_and_names_a_node_to_exclude_after_the_window():
    emitted, now = [], [0.0]
    judge = StragglerJudge(2.0, 5.0, lambda kind, **f: emitted.append((kind, f)), clock=lambda: now[0])
    slow = {"a": node("a", 0.01), "b": node("b", 0.09)}
    assert judge.judge(slow, 0) is None
    now[0] = 3.0
    assert judge.judge(slow, 0) is None
    assert [k for k, _ in emitted] == ["straggler"] and emitted[0][1]["straggler"] == "b"
    now[0] = 5.0
    assert judge.judge(slow, 0) == "b"
    assert judge.judge({"a": node("a", 0.01), "b": node("b", 0.011)}, 0) is None  # b recovered
    assert emitted[-1] == ("straggler_cleared", {"round": 0, "straggler": "b"})
    assert judge.judge(slow, 0) is None  # flagged again: a new window starts
    assert judge.judge({n: node(n, s.busy_per_step, round_=1) for n, s in slow.items()}, 0) is None  # other round


def test_busy_time_counts_computing_and_waiting_for_a_cpu_but_not_sleep():
    pid = os.getpid()
    before = busy_seconds(pid)
    threading.Event().wait(0.3)  # asleep: not busy
    slept = busy_seconds(pid)
    assert slept - before < 0.1
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # computing, or runnable and waiting for a CPU: busy either way
        pass
    assert busy_seconds(pid) - slept > 0.2
    assert busy_seconds(2**22 + 12345) is None  # no such process


def test_exclude_stragglers_ends_the_round_with_a_failure_against_the_straggler(etcd_server, run_id):
    """The judging agent's side, on a real etcd: the nodes' status keys in, a round ended
    against the straggler out (the failure record that puts it in cooldown, a restart spent)."""
    config = LaunchConfig(entrypoint=__file__, args=(), min_nodes=1, max_nodes=2, rdzv_endpoint=etcd_server.endpoint,
                          run_id=run_id, node_id="a", max_restarts=3, exclude_stragglers=True, straggler_window=0.01)
    client = connect(EtcdConfig(etcd_server.endpoint))
    rdzv = EtcdRendezvous(EtcdBackend(client, "elastic", run_id, "a"), config, "127.0.0.1", lambda: 29500)
    peer = EtcdBackend(connect(EtcdConfig(etcd_server.endpoint)), "elastic", run_id, "b")
    events = EventLog(None, run_id=run_id, node_id="a")
    seen: list[dict] = []
    events.listeners.append(seen.append)
    rdzv.start()
    publisher = StatusPublisher(config, rdzv, events)
    try:
        rdzv.publish_status(node("a", 0.01))
        peer.put_status(node("b", 0.09), on_lease=False)
        wait_until("b excluded", lambda: publisher.judge_stragglers(0) or any(
            e["event"] == "straggler_excluded" for e in seen), 10)
        run = read_run(client, "elastic", run_id)
    finally:
        publisher.close()
        rdzv.shutdown()
        peer.shutdown()
    assert [e["event"] for e in seen] == ["straggler", "straggler_excluded"]
    assert seen[0]["straggler"] == "b" and "straggler" in seen[1]["reason"]
    assert run.round == 1 and run.restarts == 1 and run.nodes["b"].failures == 1
    assert run.round_end.failure and "node b is a straggler" in run.round_end.reason
