"""`elastic-run` end to end: real etcd, real worker processes, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import SCRIPTS, alive, child_env, descendants, elastic_run, read_jsonl, wait_for_files, wait_gone

PLAIN = os.path.join(SCRIPTS, "plain_ddp.py")


def reference_params() -> dict[str, list]:
    """What plain_ddp.py computes, in one process: DDP averages the two ranks' gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        opt.zero_grad()
        for rank in range(2):
            x = torch.arange(8, dtype=torch.float64).reshape(2, 4) / 10 + rank + step
            ((model(x) ** 2).mean() / 2).backward()
        opt.step()
    return {n: p.detach().tolist() for n, p in model.named_parameters()}


def assert_params_close(got: dict, want: dict) -> None:
    for name, value in want.items():
        assert torch.allclose(torch.tensor(got[name]), torch.tensor(value), rtol=0, atol=1e-12), name


def test_plain_torchrun_script_runs_unchanged(tmp_path):
    proc = elastic_run("--standalone", "--nproc-per-node", "2", PLAIN, str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["restart"] == 0
    assert_params_close(result["params"], reference_params())
    env1 = json.loads((tmp_path / "env-restart0-rank1.json").read_text())
    assert env1["RANK"] == "1" and env1["LOCAL_RANK"] == "1" and env1["WORLD_SIZE"] == "2"
    assert env1["LOCAL_WORLD_SIZE"] == "2" and env1["GROUP_RANK"] == "0"
    assert env1["MASTER_ADDR"] == "127.0.0.1" and int(env1["MASTER_PORT"]) > 0
    assert env1["TORCHELASTIC_RESTART_COUNT"] == "0" and env1["TORCHELASTIC_MAX_RESTARTS"] == "0"
    assert env1["TORCHELASTIC_RUN_ID"] and env1["ELASTIC_ROUND"] == "0"
    assert "SUCCEEDED" in err


def test_sigkill_of_one_rank_restarts_the_group_and_succeeds(tmp_path):
    proc = elastic_run("--standalone", "--nproc_per_node", "2", "--max_restarts", "1", PLAIN,
                       str(tmp_path), "hold")
    wait_for_files([str(tmp_path / "pid-rank0"), str(tmp_path / "pid-rank1")], proc=proc)
    victim = int((tmp_path / "pid-rank1").read_text())
    survivor = int((tmp_path / "pid-rank0").read_text())
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not alive(survivor), "the surviving rank of the failed round was not stopped"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["restart"] == 1
    assert_params_close(result["params"], reference_params())
    env = json.loads((tmp_path / "env-restart1-rank0.json").read_text())
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1" and env["ELASTIC_ROUND"] == "1"
    assert "rank 1 killed by SIGKILL" in err and "restarts: 1" in err


def test_always_failing_script_exhausts_restarts_with_a_summary(tmp_path):
    # --no-warm-pool here and below where a test is not about the spares (the last tests are):
    # a spare imports more than these scripts need, and refills compete with the rounds.
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--no-warm-pool", PLAIN,
                       str(tmp_path), "fail")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "FAILED" in err and "exit code 3" in err
    assert "restarts exhausted (2 allowed)" in err
    # Three attempts: the first run and two restarts.
    assert sorted(p.name for p in tmp_path.glob("env-restart*-rank0.json")) == [
        "env-restart0-rank0.json", "env-restart1-rank0.json", "env-restart2-rank0.json"]
    # Workers may print tracebacks (a peer died under them); the supervisor never does.
    assert not [line for line in err.splitlines() if "Traceback" in line and not line.startswith("[rank")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-flag", PLAIN], "unrecognized arguments: --no-such-flag"),
        (["--standalone", "missing_script.py"], "training script 'missing_script.py' not found"),
        (["--nproc-per-node", "0", "--standalone", PLAIN], "--nproc-per-node 0 must be >= 1"),
        (["--nnodes", "2:1", "--rdzv-endpoint", "127.0.0.1:2379", PLAIN], "MAX must be >= MIN"),
        (["--rdzv-endpoint", "127.0.0.1:1", "--rdzv-conf", "connect_timeout=1", PLAIN],
         "cannot reach etcd at 127.0.0.1:1"),
        (["--rdzv-endpoint", "nonsense", PLAIN], "is not HOST:PORT"),
        (["--rdzv-conf", "bogus=1", PLAIN], "unknown option 'bogus=1'"),
        (["--rdzv-backend", "zookeeper", PLAIN], "--rdzv-backend 'zookeeper' is not supported"),
    ],
)
def test_bad_input_gets_one_line_error_fast(args, message):
    start = time.monotonic()
    proc = elastic_run(*args)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert time.monotonic() - start < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elastic-run: error:") and message in lines[0], err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_orphans_after_supervisor_signal(tmp_path, sig):
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--grace", "2", PLAIN, str(tmp_path), "hang")
    wait_for_files([str(tmp_path / "pid-rank0"), str(tmp_path / "pid-rank1")], proc=proc)
    family = descendants(proc.pid)
    workers = {int((tmp_path / f"pid-rank{r}").read_text()) for r in range(2)}
    assert workers <= family and len(family) >= 3  # two workers and the private etcd
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig
    assert wait_gone(family) == set(), "processes outlived the supervisor"


PROGRESS = os.path.join(SCRIPTS, "progress_worker.py")


def test_hung_rank_holding_the_gil_is_detected_dumped_and_restarted(tmp_path):
    log_dir = tmp_path / "logs"
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--no-warm-pool",
                       "--hang-timeout", "2", "--log-dir", str(log_dir), PROGRESS, str(tmp_path), "spin", "5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # rank 1 spins; rank 0 waits for it in the all-reduce: both are quiet since step 4.
    assert "rank 0,1 hung: no step for 2s after step 4" in err
    assert (tmp_path / "done-rank1-restart1").exists()
    # The stacks were dumped into the hung rank's log before it was killed.
    dumped = (log_dir / "round0" / "rank1.stderr.log").read_text()
    assert "spin_holding_the_gil" in dumped and "most recent call first" in dumped
    assert "goodput:" in err and "lost to failure recovery" in err

    # The same accounting, offline, with a timeline picture.
    png = tmp_path / "timeline.png"
    report = subprocess.run([sys.executable, "-m", "elastic", "report", str(log_dir / "events.jsonl"),
                             "--json", "--png", str(png)], capture_output=True, text=True, env=child_env())
    assert report.returncode == 0, report.stderr
    (node,) = json.loads(report.stdout).values()
    assert node["steps"] == 20 and node["rounds"] == 2 and len(node["failures"]) == 1
    # The 2 s between the last step and the hang's detection were lost (a discarded tail).
    assert 0 < node["goodput"] < 1 and node["lost"]["discarded tail"] >= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrated_hang_timeout_follows_the_step_times(tmp_path):
    # Steps take ~0.05 s: "auto:10:1" judges a quiet rank hung after max(1 s, 10 x its slowest
    # step) instead of the fixed 300 s default.
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--no-warm-pool",
                       "--hang-timeout", "auto:10:1", PROGRESS, str(tmp_path), "spin", "6")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert re.search(r"hung: no step for [\d.]+s after step 5 \(calibrated: 10 x its slowest step", err), err
    assert (tmp_path / "done-rank1-restart1").exists()


def test_same_error_at_same_step_stops_at_the_third(tmp_path):
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "5", "--no-warm-pool", PROGRESS,
                       str(tmp_path), "raise", "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "rank 1 raised RuntimeError: boom at step 3 again at step 2" in err
    assert "the same-failure rule stopped the job (3 identical failures in a row" in err
    assert "not retrying a deterministic failure" in err
    assert "restarts: 2" in err  # stopped after the third identical failure, not after 5 restarts


def test_redirects_and_rank_filter_keep_streams_in_files(tmp_path):
    log_dir = tmp_path / "logs"
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--no-warm-pool", "--log-dir", str(log_dir),
                       "--local-ranks-filter", "0", PROGRESS, str(tmp_path), "raise", "3")
    out, err = proc.communicate(timeout=120)
    assert "[rank0]" in err and "[rank1]" not in out + err
    assert "RuntimeError: boom at step 3" in (log_dir / "round0" / "rank1.stderr.log").read_text()
    events = read_jsonl(log_dir / "events.jsonl")
    assert [e["event"] for e in events][:2] == ["round_sealed", "workers_started"]
    assert events[-1]["event"] == "job_end" and events[-1]["exit_code"] == 1
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["rank"] == 1 and "RuntimeError: boom at step 3" in failure["reason"]

    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--no-warm-pool", "--redirects", "3",
                       "--log-dir", str(log_dir), PROGRESS, str(tmp_path), "raise", "3")
    out, err = proc.communicate(timeout=120)
    assert "[rank" not in out + err  # both streams of both ranks only in the files
    assert "elastic-run: FAILED" in err


LOOP = os.path.join(os.path.dirname(SCRIPTS), "loop_worker.py")


def events_of(log_dir) -> list[dict]:
    return read_jsonl(log_dir / "events.jsonl")


def wait_event(log_dir, kind: str, proc: subprocess.Popen, after: float = 0.0, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events_of(log_dir) if e["event"] == kind and e["time"] >= after]
        if found:
            return found[0]
        assert proc.poll() is None, f"elastic-run exited {proc.returncode}:\n{proc.communicate()[1]}"
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event within {timeout:g}s: {events_of(log_dir)}")


def test_restart_runs_in_warm_spares_and_no_spare_outlives_a_sigkilled_supervisor(tmp_path):
    log_dir = tmp_path / "logs"
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(log_dir),
                       LOOP, "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt"), "--max-steps", "100000",
                       "--save-every", "5", "--step-delay", "0.05")
    try:
        # Spares are started once round 0 made its first step; wait until they imported torch.
        ready = wait_event(log_dir, "spares_ready", proc)
        spares = set(ready["pids"])
        before_fault = descendants(proc.pid)
        assert spares <= before_fault and len(spares) == 2
        victim = json.loads((tmp_path / "boot.run.rank1.jsonl").read_text().splitlines()[0])["pid"]
        fault = time.time()
        os.kill(victim, signal.SIGKILL)
        restarted = wait_event(log_dir, "workers_started", proc, after=fault)
        assert restarted["round"] == 1 and set(restarted["pids"]) == spares  # processes older than the fault
        for rank in range(2):  # the spares ran the restarted ranks: resumed, and stepping
            wait_for_files([str(tmp_path / f"ids.run.restart1.rank{rank}.jsonl")], proc=proc)
        boots = [json.loads((tmp_path / f"boot.run.restart1.rank{r}.jsonl").read_text()) for r in range(2)]
        assert {b["pid"] for b in boots} == spares and all(b["round"] == "1" for b in boots)
        # The next spares, idle, die with a SIGKILLed supervisor like the workers do.
        idle = set(wait_event(log_dir, "spares_ready", proc, after=fault)["pids"])
        family = descendants(proc.pid)
        assert idle | spares <= family
        proc.kill()
        proc.communicate(timeout=60)
        assert wait_gone(family) == set(), "processes outlived the supervisor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_checkpoint_commits_and_their_stall_are_in_the_events_log(tmp_path):
    log_dir = tmp_path / "logs"
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--no-warm-pool", "--log-dir", str(log_dir),
                       LOOP, "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt"), "--max-steps", "10",
                       "--save-every", "5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    commits = [e for e in events_of(log_dir) if e["event"] == "checkpoint_committed"]
    assert [c["step"] for c in commits] == [5, 10]  # the periodic save and the final one
    assert all(c["stall"] >= 0 and c["round"] == 0 for c in commits)
    assert "checkpoints: 2 committed" in err
    assert not [e for e in events_of(log_dir) if e["event"].startswith("spares")]  # --no-warm-pool


def test_a_train_loop_without_elastic_init_reports_its_steps_and_commits(tmp_path):
    """TrainLoop itself reports to the agent: a script that starts its own process group (no
    elastic.init()) still has its commits in the events log and the summary, and its steps
    judged (hang watch, crash-loop back-off)."""
    log_dir = tmp_path / "logs"
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--no-warm-pool", "--log-dir", str(log_dir),
                       os.path.join(SCRIPTS, "loop_without_init.py"), str(tmp_path / "ckpt"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    commits = [e for e in events_of(log_dir) if e["event"] == "checkpoint_committed"]
    assert [c["step"] for c in commits] == [5, 10], events_of(log_dir)
    assert "checkpoints: 2 committed" in err
