"""`elastic-run status`, the metrics endpoint and straggler flags, on one real job: two real
agents on a real etcd, one node slowed by a busy thread in its worker.

One job goes through every phase once (forming, training, a worker SIGKILLed, the end); the
fixture records what `elastic-run status --json` printed at each and the metrics scraped
over HTTP while it trained, and the tests below each check one of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from helpers import SCRIPTS, Job, child_env, wait_until

from benchmarks._common import exited
from elastic.host.net import free_port
from elastic.launcher import status_cli
from elastic.rendezvous.etcd_client import EtcdConfig, connect

pytestmark = pytest.mark.timeout(180)


def status(endpoint: str, run_id: str) -> dict | None:
    """What `elastic-run status --json` prints (run in this process: it reads etcd only);
    None while etcd has no such job yet (exit code 1)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = status_cli.main(["--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--json"])
    if code == 1 and "no job" in err.getvalue():
        return None
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def job_phases(etcd_server, tmp_path_factory):
    run_id = "status-job"
    outdir = tmp_path_factory.mktemp("status")
    port = free_port()
    job = Job(etcd_server.endpoint, run_id, outdir, "2", max_restarts=2,
              script=os.path.join(SCRIPTS, "paced_worker.py"), script_args=[str(outdir), "b"],
              flags=("--monitor-interval", "0.1", "--straggler-factor", "2"))
    seen: dict[str, object] = {"outdir": outdir, "job": job}

    def look() -> dict | None:
        return status(etcd_server.endpoint, run_id)

    try:
        job.start("a", "--metrics-port", str(port))
        alive = exited(job.agents.values(), "an agent")
        seen["forming"] = wait_until("node a in the forming round", lambda: (
            (s := look()) and s["nodes"] and s["nodes"][0]["role"] == "joining" and s), 30, alive=alive)
        job.start("b")
        seen["training"] = wait_until("both nodes training, b flagged", lambda: (
            (s := look())["state"] == "training" and all(n["steps_per_s"] for n in s["nodes"])
            and s["stragglers"] == ["b"] and s["checkpoint"] and s), 60, alive=alive)
        seen["metrics"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        seen["straggler_events"] = wait_until("a straggler event", lambda: [
            e for e in job.events("a") if e["event"] == "straggler"], 20, alive=alive)
        os.kill(job.worker_pid("a", 0), signal.SIGKILL)
        seen["after_kill"] = wait_until("training again after the SIGKILL", lambda: (
            (s := look())["state"] == "training" and s["round"] == 1
            and all(n["round"] == 1 and n["state"] == "training" for n in s["nodes"]) and s), 60, alive=alive)
        seen["codes"] = job.finish()
        seen["ended"] = look()
        client = connect(EtcdConfig(etcd_server.endpoint))
        seen["status_writes"] = {n: client.get(f"/elastic/status/{run_id}/{n}")[1].version for n in "ab"}
        client.close()
        seen["events_b"] = job.events("b")
        yield seen
    finally:
        job.kill_all()


def test_status_while_forming_shows_the_node_joining(job_phases):
    s = job_phases["forming"]
    assert s["schema"] == 1 and s["run_id"] == "status-job"
    assert s["state"] == "forming" and s["sealed_round"] is None and s["world_size"] is None
    (a,) = s["nodes"]
    assert a["node"] == "a" and a["alive"] and a["role"] == "joining" and a["addr"]


def test_status_while_training_shows_round_nodes_steps_and_checkpoint(job_phases):
    s = job_phases["training"]
    assert s["state"] == "training" and s["round"] == 0 and s["sealed_round"] == 0
    assert s["world_size"] == 2 and s["num_nodes"] == 2
    assert s["restarts"] == {"used": 0, "max": 2}
    assert [n["node"] for n in s["nodes"]] == ["a", "b"]
    for rank, node in enumerate(s["nodes"]):
        assert node["role"] == "member" and node["state"] == "training" and node["group_rank"] == rank
        assert node["step"] >= 1 and node["steps_per_s"] > 0 and len(node["pids"]) == 1
    assert s["checkpoint"]["step"] % 10 == 0 and s["checkpoint"]["step"] >= 10
    assert 0 <= s["goodput"] <= 1


def test_straggler_is_flagged_in_status_and_the_events_log(job_phases):
    s = job_phases["training"]
    a, b = s["nodes"]
    assert b["straggler"] and not a["straggler"]
    assert b["busy_per_step"] > 2 * a["busy_per_step"]
    (event, *_) = job_phases["straggler_events"]
    assert event["straggler"] == "b" and event["busy_per_step"] > 2 * event["median_others"]


def test_metrics_endpoint_scraped_over_http_during_the_run(job_phases):
    text = job_phases["metrics"]
    labels = '{node="a",run_id="status-job"}'
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values[f"elastic_world_size{labels}"] == 2
    assert values[f"elastic_round{labels}"] == 0
    assert values[f"elastic_step{labels}"] >= 1
    assert values[f"elastic_steps_per_second{labels}"] > 0
    assert values[f"elastic_step_seconds_count{labels}"] >= 1
    assert values[f"elastic_max_restarts{labels}"] == 2
    assert values[f"elastic_checkpoint_save_stall_seconds_count{labels}"] >= 1
    assert values[f"elastic_checkpoint_commit_latency_seconds_count{labels}"] >= 1
    assert 0 <= values[f"elastic_goodput_ratio{labels}"] <= 1
    assert 'elastic_lost_seconds{cause="start-up",node="a",run_id="status-job"}' in text


def test_status_after_a_sigkill_counts_the_restart_and_the_failure(job_phases):
    s = job_phases["after_kill"]
    assert s["restarts"]["used"] == 1 and s["round"] == 1
    assert s["last_round_end"]["failure"] and "rank 0" in s["last_round_end"]["reason"]
    a = next(n for n in s["nodes"] if n["node"] == "a")
    assert a["failures"] == 1 and a["state"] == "training" and a["round"] == 1


def test_status_after_the_job_ends_keeps_each_nodes_last_word(job_phases):
    assert job_phases["codes"] == {"a": 0, "b": 0}
    s = job_phases["ended"]
    assert s["state"] == "closed" and s["closed"]["ok"]
    for node in s["nodes"]:
        assert node["state"] == "exited" and not node["alive"] and node["step"] >= 1
        assert "exited 0" in node["reason"]
    assert s["checkpoint"]["step"] >= 10


def test_each_node_writes_its_status_at_most_once_a_second(job_phases):
    for node, writes in job_phases["status_writes"].items():
        events = job_phases["job"].events(node)
        seconds = events[-1]["time"] - next(e["time"] for e in events if e["event"] == "round_sealed")
        print(f"node {node}: {writes} status writes in {seconds:.1f}s")
        assert 2 <= writes <= seconds + 2  # one a second at most, plus the last word off the lease


def test_status_command_prints_tables_and_rejects_a_missing_run(job_phases, etcd_server):
    out = subprocess.run([sys.executable, "-m", "elastic", "status", "--rdzv-endpoint", etcd_server.endpoint,
                          "--rdzv-id", "status-job"], check=False, env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "run status-job: CLOSED" in out.stdout and "closed (ok)" in out.stdout
    assert out.stdout.splitlines()[5].split()[:3] == ["a", "member", "exited"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert status_cli.main(["--rdzv-endpoint", etcd_server.endpoint, "--rdzv-id", "nope"]) == 1
    assert "no job 'nope'" in err.getvalue()
