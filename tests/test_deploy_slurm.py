"""deploy/slurm/elastic.sbatch under a real Slurm: a slurmctld and a slurmd of the test's own
(single host, generated slurm.conf, free ports) run the sbatch script as two tasks, one
`elastic-run` agent each (world size 2); one worker rank is SIGKILLed mid-run; the job must
complete through a restart, then through a requeue (the time-limit signal), and end with the
parameters of an uninterrupted run, bitwise.

Skipped where Slurm is not installed or we are not root (slurmd launches jobs as root), unless
ELASTIC_REQUIRE_SLURM=1 (set by .ci/run, which installs Slurm), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos"))

from chaos_lib import check_checkpoints, check_params, final_params, read_events, read_records  # noqa: E402
from chaos_lib import Reference  # noqa: E402
from elastic.host.net import free_port  # noqa: E402
from helpers import REPO, child_env, wait_until  # noqa: E402
from loop_launch import WORKER, Group  # noqa: E402

SBATCH = os.path.join(REPO, "deploy", "slurm", "elastic.sbatch")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
# Job states that no longer change (a requeued job passes through COMPLETING, REQUEUED, PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}
STEPS, SAVE_EVERY, KILL_AT, REQUEUE_AT = 14, 3, 3, 6


def _unavailable() -> str | None:
    missing = [c for c in COMMANDS if shutil.which(c, path=SBIN_PATH) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurmctld slurmd)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run this test as root"
    return None


@pytest.fixture
def slurm(tmp_path):
    """A one-node Slurm cluster of this test's own; yields the environment its clients need."""
    reason = _unavailable()
    if reason:
        if os.environ.get("ELASTIC_REQUIRE_SLURM") == "1":
            pytest.fail(f"ELASTIC_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True)
    host = socket.gethostname()
    # auth/none: no munge key or daemon to set up, fine for a cluster that only this test reaches.
    # cred_expire: also how long a requeued job waits before it starts again (default 120 s).
    # sched_interval: a job that became eligible by the clock waits for the next pass (60 s).
    # config_overrides: the node is what this file says, whatever the hardware.
    (root / "slurm.conf").write_text(f"""\
ClusterName=elastictest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = child_env(SLURM_CONF=str(root / "slurm.conf"), PATH=SBIN_PATH)
    daemons = [subprocess.Popen([name, "-D", *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
               for name, extra, log in (("slurmctld", ["-i"], open(root / "slurmctld.log", "w")),
                                        ("slurmd", [], open(root / "slurmd.log", "w")))]

    def dead() -> str | None:
        for proc in daemons:
            if proc.poll() is not None:
                return f"{proc.args[0]} exited {proc.returncode}:\n" + (root / f"{proc.args[0]}.log").read_text()
        return None

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return out.stdout.strip() == "idle"

    try:
        wait_until("the Slurm node to be idle", idle, timeout=30, alive=dead, poll=0.1)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        for proc in daemons:
            proc.terminate()
        for proc in daemons:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def job_state(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_sbatch_job_survives_a_killed_rank_and_a_requeue_and_ends_like_an_uninterrupted_run(slurm, tmp_path):
    worker_args = ["--out", str(tmp_path), "--global-batch", "7", "--max-steps", str(STEPS),
                   "--save-every", str(SAVE_EVERY)]
    # The uninterrupted reference (world size 2, no supervisor) runs while the job does.
    reference = Group([*worker_args, "--tag", "ref", "--ckpt", str(tmp_path / "ref-ckpt")], 2, child_env())
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    env = dict(slurm, ELASTIC_NPROC_PER_NODE="1", ELASTIC_MAX_RESTARTS="1",
               ELASTIC_ETCD_PORT=str(free_port()), ELASTIC_ETCD_PEER_PORT=str(free_port()),
               ELASTIC_CHECKPOINT_DIR=str(ckpt), ELASTIC_LOG_DIR=str(logs),
               ELASTIC_RUN_FLAGS="--monitor-interval 0.05 --grace 3 --no-warm-pool")
    # One host, so two agents on it (their node ids differ by SLURM_LOCALID), one rank each.
    # The job is paced (0.3 s a step) so that the faults land mid-run.
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--time=10",
         f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", SBATCH, WORKER, *worker_args,
         "--tag", "run", "--step-delay", "0.3"],
        env=env, capture_output=True, text=True)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    out_file = tmp_path / f"job-{job_id}.out"

    def job_output() -> str:
        return out_file.read_text() if out_file.exists() else "(no output yet)"

    def job_over() -> str | None:
        state = job_state(env, job_id)["JobState"]
        return f"job {state}:\n{job_output()}" if state in FINAL_STATES else None

    def rank1_record(restart: int, step: int) -> dict | None:
        recs = [r for r in read_records(tmp_path, "run")
                if r["rank"] == 1 and r["restart"] == restart and r["step"] >= step]
        return recs[0] if recs else None

    try:
        # 1. A rank dies: elastic-run restarts the group inside the job (TORCHELASTIC_RESTART_COUNT 1).
        victim = wait_until(f"rank 1 to reach step {KILL_AT}", lambda: rank1_record(0, KILL_AT),
                            timeout=60, alive=job_over, poll=0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        # 2. The time limit nears: USR1 to the batch shell, as --signal=B:USR1@300 sends it. The
        # agents save the step they are on and stop; the script requeues the job.
        wait_until(f"the restarted rank 1 to reach step {REQUEUE_AT}", lambda: rank1_record(1, REQUEUE_AT),
                   timeout=60, alive=job_over, poll=0.05)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)
        final = wait_until("the requeued job to end", lambda: job_over() and job_state(env, job_id),
                           timeout=90, poll=0.2)
        assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", job_output()
        assert final["Restarts"] == "1", job_output()
        reference.wait_ok(timeout=60)
    finally:
        reference.kill()

    # The rank's death and the restart, in both agents' own words (their logs span both attempts).
    assert len(list(logs.glob("*/events.jsonl"))) == 2, job_output()
    events = [e for path in logs.glob("*/events.jsonl") for e in read_events(path)]
    failures = [e for e in events if e["event"] == "failure"]
    assert failures and "SIGKILL" in json.dumps(failures), failures
    assert any(e["event"] == "restart" for e in events)
    # The requeued attempt (a fresh elastic-run: restart count 0 again, new pids) took up at the
    # step after the last one the first attempt ran: the stop saved it, nothing was run twice.
    records = read_records(tmp_path, "run")
    restarted = [r for r in records if r["restart"] == 1]
    requeued = [r for r in records if r["restart"] == 0 and r["t"] > max(x["t"] for x in restarted)]
    assert {r["rank"] for r in requeued} == {0, 1}, job_output()
    assert min(r["step"] for r in requeued) == max(r["step"] for r in restarted) + 1, job_output()
    assert "attempt 1" in job_output()

    ref = Reference(2, final_params(tmp_path, "ref"), {})
    check_params(final_params(tmp_path, "run"), ref, exact=True)
    check_checkpoints(ckpt, expect_latest=STEPS)
