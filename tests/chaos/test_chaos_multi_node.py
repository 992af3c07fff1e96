"""Chaos across nodes: several `elastic-run` agents (1 rank each, distinct --node-id) on one
real etcd, running the loop job (the `loop_job` fixture); faults hit etcd, whole nodes, and the
rendezvous itself."""

from __future__ import annotations

import os
import signal
import time

import pytest

from chaos_lib import all_events, check_run, read_records, recovery, report, wait_records, wait_until
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from helpers import wait_gone
from loop_worker import loader_workers

pytestmark = pytest.mark.timeout(600)


def test_etcd_killed_and_restarted_mid_run(loop_job, private_etcd, reference):
    """etcd dies for a while mid-run and comes back on the same port with its data: training
    does not touch etcd between steps, so it goes on undisturbed, bitwise."""
    job = loop_job("2", private_etcd.endpoint, conf="last_call_timeout=1,lease_ttl=5")
    job.start("a")
    job.start("b")
    wait_records(job, "step 4", lambda r: r["step"] >= 4)
    private_etcd.kill()
    down = time.time()
    time.sleep(1.5)  # the length of the outage (the fault itself), not synchronisation
    private_etcd.restart()
    codes = {n: p.wait(300) for n, p in job.agents.items()}
    assert codes == {"a": 0, "b": 0}, "\n".join(job.log(n)[-3000:] for n in job.agents)
    events = all_events(job)
    failures = [e for e in events if e["event"] == "failure"]
    during = [r for r in read_records(job.outdir, "run") if down < r["t"] < down + 1.5]
    report("etcd-kill-restart", outage_s=1.5, failures=len(failures),
           steps_during_outage=len({r["step"] for r in during}),
           rounds=sorted({e["round"] for e in events if e["event"] == "round_sealed"}))
    assert not failures, failures  # unaffected: no restart was needed
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2))


def test_two_nodes_fail_at_once(loop_job, etcd_server, reference):
    """3 nodes x 1 rank (nnodes 1:3); two whole nodes are SIGKILLed together. The survivor
    re-rendezvous alone, resumes at world size 1 from the last checkpoint and finishes
    within 1e-7 of the world-3 reference, every sample still consumed once per step."""
    job = loop_job("1:3", etcd_server.endpoint, conf="last_call_timeout=20")
    for node in ("a", "b", "c"):
        job.start(node)
    wait_records(job, "step 5 at world 3", lambda r: r["step"] >= 5 and r["world"] == 3)
    fault = time.time()
    for node in ("b", "c"):
        os.kill(job.agents[node].pid, signal.SIGKILL)  # the node: its worker dies with its agent
    code = job.agents["a"].wait(300)
    assert code == 0, job.log("a")[-4000:]
    records = read_records(job.outdir, "run")
    after = [r for r in records if r["t"] > fault]
    assert after and {r["world"] for r in after if r["restart"] > 0} == {1}, after
    restart = max(r["restart"] for r in records)
    report("two-nodes-fail", **recovery(job.events("a"), records, fault, restart))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(3), exact=False)


def test_kill_during_rendezvous(loop_job, etcd_server, reference):
    """Node a's agent is SIGKILLed while it waits in the rendezvous for a second node (its
    membership left behind in etcd); a comes back, b joins, and the job runs normally."""
    job = loop_job("2", etcd_server.endpoint, conf="last_call_timeout=1")
    job.start("a")
    client = connect(EtcdConfig(etcd_server.endpoint))
    try:
        key = f"/elastic/{job.run_id}/rounds/0/members/a"
        wait_until("a to join round 0", lambda: client.get(key)[0] is not None, 120)
    finally:
        client.close()
    os.kill(job.agents["a"].pid, signal.SIGKILL)
    job.agents["a"].wait()
    killed = time.time()
    job.start("b")
    job.start("a")
    codes = {n: p.wait(300) for n, p in job.agents.items()}
    assert codes == {"a": 0, "b": 0}, "\n".join(job.log(n)[-3000:] for n in job.agents)
    records = read_records(job.outdir, "run")
    sealed = [e for e in all_events(job) if e["event"] == "round_sealed"]
    report("kill-during-rendezvous", rounds=sorted({e["round"] for e in sealed}),
           first_step_after_kill_s=round(min(r["t"] for r in records) - killed, 2))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2))


def test_node_added_mid_run_grows_without_losing_a_step(loop_job, etcd_server, reference):
    """2 nodes x 1 rank (nnodes 2:3) train; a third arrives. The agents see it by watch,
    ask the workers to park after a step they all agree on (TrainLoop saves it), and the
    job goes on at world size 3 from that step, a's and b's workers re-formed in-process
    (same pids) with c's new one: no restart spent, no step lost or repeated, within 1e-7
    of the uninterrupted run."""
    job = loop_job("2:3", etcd_server.endpoint, conf="last_call_timeout=1")
    slow = job.outdir / "slow"
    slow.touch()  # slow steps until c is in: a loaded machine must not let a and b finish first
    job.start("a")
    job.start("b")
    wait_records(job, "step 5 at world 2", lambda r: r["step"] >= 5 and r["world"] == 2)
    arrived = time.time()
    job.start("c")
    wait_records(job, "a step at world 3", lambda r: r["world"] == 3)
    slow.unlink()
    codes = {n: p.wait(300) for n, p in job.agents.items()}
    assert codes == {"a": 0, "b": 0, "c": 0}, job.log("a")[-4000:]
    records = read_records(job.outdir, "run")
    assert {r["restart"] for r in records} == {0}  # growth is not a failure
    grown = [r for r in records if r["world"] == 3]
    assert grown and min(r["t"] for r in grown) > arrived
    sealed = [(e["round"], e["world_size"]) for e in job.events("a") if e["event"] == "round_sealed"]
    assert sealed == [(0, 2), (1, 3)]
    for node in ("a", "b"):
        kept = {e["event"]: e["pids"] for e in job.events(node) if e["event"].startswith("workers_")}
        assert kept.keys() == {"workers_started", "workers_reconfigured"}, kept
        assert kept["workers_started"] == kept["workers_reconfigured"]
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2), exact=False)


def test_growth_and_leave_reconfigure_the_staying_worker_in_process(loop_job, etcd_server, reference):
    """Node a trains alone (nnodes 1:2, DDP at world size 1); b arrives, then leaves on
    SIGTERM. a's worker is never restarted: at both changes it parks after a step the ranks
    agree on, re-forms the process group at the new world size and resumes from that step's
    checkpoint, like b's fresh worker; its DataLoader (2 worker processes) is rebuilt for
    the new placement, the old one's workers gone. No restart spent, no step lost or
    repeated, within 1e-7 of the uninterrupted run."""
    job = loop_job("1:2", etcd_server.endpoint, "last_call_timeout=1", 3, "--ddp", "--num-workers", "2")
    slow = job.outdir / "slow"
    slow.touch()  # slow steps until b has come and gone: the job must not end first
    job.start("a")
    a_pid = wait_records(job, "step 3 at world 1", lambda r: r["step"] >= 3 and r["world"] == 1)["pid"]

    def a_loader_workers(round_: str) -> set[int]:  # the pids of those a's worker started in round_
        found = loader_workers(job.outdir / "loader_pids.run")
        return {w["pid"] for w in found if w["round"] == round_ and w["parent"] == a_pid}

    job.start("b")
    wait_records(job, "a step at world 2", lambda r: r["world"] == 2 and r["pid"] == a_pid)
    assert len(a_loader_workers("0")) == len(a_loader_workers("1")) == 2
    assert wait_gone(a_loader_workers("0")) == set()  # while a's worker trains on in round 1
    job.agents["b"].send_signal(signal.SIGTERM)
    assert job.agents["b"].wait(120) == 0, job.log("b")[-4000:]
    wait_records(job, "a step at world 1 after b left", lambda r: r["world"] == 1 and r["round"] == "2", needed="a")
    assert len(a_loader_workers("2")) == 2 and wait_gone(a_loader_workers("1")) == set()
    slow.unlink()
    assert job.agents["a"].wait(300) == 0, job.log("a")[-4000:]
    events = job.events("a")
    assert [(e["round"], e["world_size"]) for e in events if e["event"] == "round_sealed"] == [(0, 1), (1, 2), (2, 1)]
    started = [e for e in events if e["event"] == "workers_started"]
    reconfigured = [e for e in events if e["event"] == "workers_reconfigured"]
    assert [e["round"] for e in started] == [0] and [e["round"] for e in reconfigured] == [1, 2], events
    assert {tuple(e["pids"]) for e in started + reconfigured} == {tuple(started[0]["pids"])}
    records = read_records(job.outdir, "run")
    assert {r["restart"] for r in records} == {0}  # neither change is a failure
    alone = {r["pid"] for r in records if r["round"] in ("0", "2")}
    assert alone == set(started[0]["pids"]) <= {r["pid"] for r in records if r["round"] == "1"}
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2), exact=False)
