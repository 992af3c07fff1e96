"""Chaos: a worker that SIGKILL cannot end (uninterruptible sleep, D state), across two nodes.

A rank stuck in the kernel (a dead NFS server, a wedged GPU driver) stops making progress and
ignores SIGKILL. Here the cgroup v1 freezer makes one real: a frozen process is in D state and
a SIGKILL stays pending until it is thawed. The node with the frozen rank must notice, give
up after --unkillable-timeout (its agent exits, it does not wedge), and the other node
must go on alone from the last checkpoint and finish as the uninterrupted run would.

Needs root and the freezer hierarchy at /sys/fs/cgroup/freezer; skipped with the reason
otherwise. Every cgroup made here is named elastic-chaos-<pid>-<n>; teardown thaws it (the
pending SIGKILL then ends the process), kills what is left in it and removes it, and a later
run removes groups left by a test process that was itself killed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from chaos_lib import all_events, check_run, read_records, report, wait_records, wait_until
from elastic.host.process import kernel_state
from helpers import SCRIPTS, alive, elastic_run, wait_for_files

pytestmark = pytest.mark.timeout(600)

FREEZER = Path("/sys/fs/cgroup/freezer")
PREFIX = "elastic-chaos-"
HANG_TIMEOUT = 2.0  # node b's --hang-timeout: how soon the frozen rank is judged hung (steps take 0.08 s)
UNKILLABLE = 2.0  # node b's --unkillable-timeout


def _release(group: Path) -> None:
    """Thaw `group`, kill whatever is in it, and remove it once it is empty."""
    (group / "freezer.state").write_text("THAWED")
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(f"{group} to empty", lambda: not (group / "cgroup.procs").read_text().strip(), 30)
    group.rmdir()


@pytest.fixture
def freeze():
    """freeze(pid): put every thread of `pid` in a new frozen cgroup (D state)."""
    if os.geteuid() != 0:
        pytest.skip("freezing a process needs root (cgroup v1 freezer)")
    if not (FREEZER / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v1 freezer hierarchy mounted at {FREEZER}")
    for left in FREEZER.glob(f"{PREFIX}*"):  # from a test process that was killed
        owner = int(left.name[len(PREFIX):].split("-")[0])
        if not alive(owner):
            _release(left)
    made: list[Path] = []

    def do(pid: int) -> None:
        group = FREEZER / f"{PREFIX}{os.getpid()}-{len(made)}"
        group.mkdir()
        made.append(group)
        (group / "cgroup.procs").write_text(str(pid))  # the whole process, not one thread
        (group / "freezer.state").write_text("FROZEN")
        wait_until(f"pid {pid} frozen", lambda: (group / "freezer.state").read_text().strip() == "FROZEN", 30)

    try:
        yield do
    finally:
        for group in made:
            _release(group)


@pytest.mark.parametrize("found_by", ["hang", "peer_failure"])
def test_frozen_rank_makes_its_node_give_up(loop_job, etcd_server, reference, freeze, found_by):
    """2 nodes x 1 rank (nnodes 1:2); node b's worker is frozen mid-run (D state).

    found_by="hang": b's agent judges it hung (b: --hang-timeout 2; a: 300, so the failure
    is b's to find), dumps stacks (a signal: it cannot block on a frozen rank) and SIGKILLs
    it. found_by="peer_failure": a's worker is SIGKILLed next; b learns of the failure by
    the round bump and SIGKILLs its worker. Either way b's agent gives up after --unkillable-timeout
    while the worker is still frozen: event node_bad, exit 1, a reason that names the rank
    and pid and says to drain or reboot the node. Node a goes on alone at world 1 from the
    last checkpoint and finishes within 1e-7 of the world-2 reference, every sample once per
    step, every committed checkpoint readable."""
    job = loop_job("1:2", etcd_server.endpoint, conf="last_call_timeout=20")
    job.start("a", "--hang-timeout", "300")
    job.start("b", "--hang-timeout", str(HANG_TIMEOUT) if found_by == "hang" else "300",
              "--unkillable-timeout", str(UNKILLABLE))
    started = [wait_until(f"{node}'s workers", lambda: next(
        (e for e in job.events(node) if e["event"] == "workers_started"), None), 240) for node in ("a", "b")]
    (peer,), (victim,) = (e["pids"] for e in started)
    wait_records(job, "step 5 of b's worker", lambda r: r["pid"] == victim and r["step"] >= 5)
    fault_at = time.time()
    freeze(victim)
    assert kernel_state(victim).startswith("state D"), kernel_state(victim)
    detection = HANG_TIMEOUT
    if found_by == "peer_failure":
        fault_at = time.time()
        os.kill(peer, signal.SIGKILL)
        detection = 0.0

    code_b = job.agents["b"].wait(240)
    still = kernel_state(victim)  # read first: the agent must have left it behind, still frozen
    log_b = job.log("b")
    assert code_b == 1, log_b[-4000:]
    assert still.startswith("state D"), f"the frozen worker is in {still}"
    events_b = job.events("b")
    kinds = [e["event"] for e in events_b]
    assert kinds[-2:] == ["node_bad", "job_end"], kinds
    bad, end = events_b[-2], events_b[-1]
    assert bad["pids"] == [victim], bad
    for part in (f"pid {victim}", "survived SIGKILL", "state D", "node b leaves the job", "drain or reboot"):
        assert part in end["reason"], end["reason"]
    assert end["reason"] in log_b  # the summary shows it too
    # It waited --unkillable-timeout for the kill, and no longer than detection + that + slack.
    took = bad["time"] - fault_at
    assert UNKILLABLE <= took <= detection + UNKILLABLE + 30, took

    code_a = job.agents["a"].wait(300)
    assert code_a == 0, job.log("a")[-4000:]
    records = read_records(job.outdir, "run")
    alone = [r for r in records if r["t"] > bad["time"]]
    assert alone and {r["world"] for r in alone} == {1}, alone
    events = all_events(job)
    sealed = [(e["node"], e["round"], e["world_size"]) for e in events if e["event"] == "round_sealed"]
    report(f"frozen-rank-{found_by}", node_bad_after_s=round(took, 2), unkillable_timeout=UNKILLABLE,
           sealed=sealed, a_finished_after_s=round(events[-1]["time"] - fault_at, 2))
    check_run(job.outdir, "run", job.outdir / "ckpt", reference(2), exact=False)


def test_a_frozen_process_that_a_worker_started_is_reported(tmp_path, freeze):
    """A worker's own child is frozen (D state) when its group is killed: elastic-run waits
    --unkillable-timeout for it, not forever, and names it (whose it is, its pid, its state)."""
    proc = elastic_run("--standalone", "--no-warm-pool", "--unkillable-timeout", "1",
                       os.path.join(SCRIPTS, "child_starter.py"), str(tmp_path), "group", "wait")
    wait_for_files([str(tmp_path / "ready-rank0")], proc=proc)
    child = int((tmp_path / "child-rank0").read_text())
    with open(f"/proc/{child}/stat") as stat:
        worker = int(stat.read().rsplit(")", 1)[1].split()[1])
    freeze(child)
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    for part in (f"a process of rank 0 (pid {child}: state D", "survived SIGKILL", "drain or reboot"):
        assert part in err, err
