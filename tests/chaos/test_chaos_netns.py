"""Chaos across simulated nodes in network namespaces (tests/chaos/netns.py): 3 agents, each
in its own namespace with its own addresses, etcd in a hub namespace on a control network,
peer traffic (MASTER_ADDR store, gloo) on a separate data network. Links are cut for real."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
from chaos_lib import check_run, job_args, read_events, read_records, report, wait_records
from helpers import Job

pytestmark = pytest.mark.timeout(600)

LEASE_TTL = 5  # shorter leases expire by themselves when the machine is overloaded
HANG_TIMEOUT = 5


@pytest.fixture
def cluster():
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns.sweep_stale()
    with netns.Cluster() as made:
        yield made


@pytest.fixture
def netns_job(cluster, tmp_path):
    """A loop job on etcd in the hub, for agents in nodes a, b and c (started with `start`)."""
    jobs: list[Job] = []

    def make(nnodes: str, conf: str = "") -> Job:
        for name in "abc":
            cluster.add_node(name)
        etcd = cluster.start_etcd()
        args = job_args(tmp_path, "run", "--slow-while", str(tmp_path / "slow"))
        rdzv = f"lease_ttl={LEASE_TTL},last_call_timeout=1,probe_timeout=1,outage_timeout=600"
        job = Job(etcd.endpoint, f"netns-{uuid.uuid4().hex[:8]}", tmp_path, nnodes, rdzv + ("," + conf if conf else ""),
                  max_restarts=5, script=args[0], script_args=args[1:],
                  flags=("--checkpoint-dir", str(tmp_path / "ckpt"), "--monitor-interval", "0.05",
                         "--hang-timeout", str(HANG_TIMEOUT), "--first-step-timeout", "300"))
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.kill_all()


def start(cluster: netns.Cluster, job: Job, name: str) -> None:
    """The node's agent, inside its namespace, telling peers to reach it on the data network."""
    node = cluster.nodes[name]
    node.call(job.start, name, "--local-addr", node.data_addr)


def events(job: Job, node: str) -> list[dict]:
    return read_events(job.outdir / f"logs-{node}" / "events.jsonl")


def after(events: list[dict], kind: str, at: float, **match) -> dict | None:
    return next((e for e in events if e["event"] == kind and e["time"] >= at - 0.0005
                 and all(e.get(k) == v for k, v in match.items())), None)


@dataclass(frozen=True)
class Fault:
    cut: float  # wall times
    shrunk: dict  # the first step record at world 2 after the cut
    restored: float
    regrown: dict  # the first step record at world 3 after the restore


def shrink_times(job: Job, fault: Fault) -> dict[str, float]:
    """Seconds from the cut to: a's failure event, the world-2 round sealed, its workers
    started, and the first world-2 step."""
    seen, cut = events(job, "a"), fault.cut
    return {"detect": round(after(seen, "failure", cut)["time"] - cut, 2),
            "sealed": round(after(seen, "round_sealed", cut, world_size=2)["time"] - cut, 2),
            "spawned": round(after(seen, "workers_started", cut)["time"] - cut, 2),
            "first_step": round(fault.shrunk["t"] - cut, 2)}


def cut_shrink_restore_grow(cluster: netns.Cluster, job: Job, slow: Path, **links: bool) -> Fault:
    """Run a, b, c; at step >= 5 cut c's links; once a and b made a step at world 2, restore
    them; wait for a step at world 3 again and for the job to end, every agent exiting 0.
    Steps are slow (`slow` exists) until the job has grown back, so it cannot end first."""
    slow.touch()
    for name in "abc":
        start(cluster, job, name)
    wait_records(job, "step 5 at world 3", lambda r: r["step"] >= 5 and r["world"] == 3)
    cut = cluster.cut("c", **links)
    shrunk = wait_records(job, "a step at world 2", lambda r: r["world"] == 2 and r["t"] > cut, needed="ab")
    restored = cluster.restore("c")
    regrown = wait_records(job, "a step at world 3 after the restore", lambda r: r["world"] == 3 and r["t"] > restored)
    slow.unlink()
    codes = {n: p.wait(300) for n, p in job.agents.items()}
    assert codes == {"a": 0, "b": 0, "c": 0}, "\n".join(job.log(n)[-3000:] for n in job.agents)
    return Fault(cut, shrunk, restored, regrown)


def test_partition_and_restore(cluster, netns_job, tmp_path, reference):
    """Node c loses both links mid-run. a and b see its lease expire, shrink to world 2 and go
    on from the last checkpoint; c's worker is stuck (no step, no commit) until its agent,
    reconnected, learns that its lease expired, kills it and rejoins; the job grows back to 3
    nodes and ends within 1e-7 of the uninterrupted run."""
    job = netns_job("2:3")
    fault = cut_shrink_restore_grow(cluster, job, tmp_path / "slow")
    records = read_records(job.outdir, "run")
    cut_round = max(int(r["round"]) for r in records if r["t"] < fault.cut)
    stuck = [r for r in records if int(r["round"]) == cut_round and r["t"] > fault.cut + 0.5]
    assert not stuck, f"round {cut_round} made steps after c was cut off: {stuck}"
    assert after(events(job, "a"), "failure", fault.cut)["node"] == "c"
    rejoined = after(events(job, "c"), "round_sealed", fault.restored)
    assert rejoined["world_size"] == 3, rejoined
    report("partition", **shrink_times(job, fault), outage_s=round(fault.restored - fault.cut, 2),
           rejoined_s=round(rejoined["time"] - fault.restored, 2),
           first_step_at_3_s=round(fault.regrown["t"] - fault.restored, 2))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(3), exact=False)


def test_asymmetric_partition(cluster, netns_job, tmp_path, reference):
    """Node c keeps etcd but loses its peers (data link cut). Every worker hangs in a
    collective; every agent probes its peers when the hang is detected, and the node the
    others cannot reach (c) is blamed, not an innocent one; c fails the reachability probe
    before its next workers start, goes into cooldown, and a and b go on at world 2. Once
    the link is back, c is admitted again and the job ends within 1e-7 of the uninterrupted
    run."""
    job = netns_job("2:3", conf="cooldown_base=2")
    fault = cut_shrink_restore_grow(cluster, job, tmp_path / "slow", control=False)
    blamed = {e["node"] for n in "abc" for e in events(job, n) if e["event"] == "failure" and e["time"] > fault.cut}
    assert blamed == {"c"}, blamed
    report("asymmetric-partition", **shrink_times(job, fault), outage_s=round(fault.restored - fault.cut, 2),
           first_step_at_3_s=round(fault.regrown["t"] - fault.restored, 2))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(3), exact=False)


def test_node_added(cluster, netns_job, tmp_path, reference):
    """a and b train at world 2 (nnodes 2:3); c arrives from its own namespace. The job grows
    to world 3 at a step all agree on, without a restart, within 1e-7 of the uninterrupted run."""
    job = netns_job("2:3")
    (tmp_path / "slow").touch()  # slow steps until c is in
    start(cluster, job, "a")
    start(cluster, job, "b")
    wait_records(job, "step 5 at world 2", lambda r: r["step"] >= 5 and r["world"] == 2, needed="ab")
    arrived = time.time()
    start(cluster, job, "c")
    wait_records(job, "a step at world 3", lambda r: r["world"] == 3)
    (tmp_path / "slow").unlink()
    codes = {n: p.wait(300) for n, p in job.agents.items()}
    assert codes == {"a": 0, "b": 0, "c": 0}, job.log("a")[-4000:]
    records = read_records(job.outdir, "run")
    assert {r["restart"] for r in records} == {0}  # growth is not a failure
    sealed = [(e["round"], e["world_size"]) for e in events(job, "a") if e["event"] == "round_sealed"]
    assert sealed == [(0, 2), (1, 3)]
    grown = min(r["t"] for r in records if r["world"] == 3)
    report("node-added-netns", first_step_at_3_s=round(grown - arrived, 2),
           grow_sealed_s=round(after(events(job, "a"), "round_sealed", arrived, world_size=3)["time"] - arrived, 2))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2), exact=False)
