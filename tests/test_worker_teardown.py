"""How a worker group ends under `elastic-run`: what its workers started dies with it, a
checkpoint commit in flight is waited for (up to a bound), the agent's run directory goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import SCRIPTS, alive, child_env, elastic_run, read_jsonl, wait_for_files

STARTER = os.path.join(SCRIPTS, "child_starter.py")
SLOW_COMMIT = os.path.join(SCRIPTS, "slow_commit.py")


def _child(outdir, rank: int = 0) -> int:
    return int((outdir / f"child-rank{rank}").read_text())


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_children_of_a_sigkilled_worker_die_with_the_group(tmp_path):
    proc = elastic_run("--standalone", "--no-warm-pool", "--nproc-per-node", "2", STARTER, str(tmp_path),
                       "group", "wait")
    wait_for_files([str(tmp_path / f"ready-rank{r}") for r in range(2)], proc=proc)
    children = [_child(tmp_path, r) for r in range(2)]
    with open(f"/proc/{children[1]}/stat") as stat:
        worker = int(stat.read().rsplit(")", 1)[1].split()[1])  # the child's parent
    try:
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert [c for c in children if alive(c)] == [], "a worker's child outlived elastic-run"
    finally:
        for child in children:
            _kill_if_alive(child)


def test_children_in_a_process_group_of_their_own_die_when_the_group_is_stopped(tmp_path):
    proc = elastic_run("--standalone", "--no-warm-pool", "--grace", "1", STARTER, str(tmp_path), "own-group", "wait")
    wait_for_files([str(tmp_path / "ready-rank0")], proc=proc)
    child = _child(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert not alive(child), "a child in its own process group outlived elastic-run"
    finally:
        _kill_if_alive(child)


def test_children_of_workers_that_exit_0_are_left_running_as_under_torchrun(tmp_path):
    proc = elastic_run("--standalone", "--no-warm-pool", STARTER, str(tmp_path), "group", "exit")
    _, err = proc.communicate(timeout=60)
    child = _child(tmp_path)
    try:
        assert proc.returncode == 0, err
        assert alive(child), "torchrun leaves what a successful worker started alone; so do we"
    finally:
        _kill_if_alive(child)


def _stop_during_a_slow_commit(tmp_path, commit_seconds: float, commit_timeout: float):
    proc = elastic_run("--standalone", "--no-warm-pool", "--grace", "0.5", "--commit-timeout", str(commit_timeout),
                       "--log-dir", str(tmp_path / "logs"), SLOW_COMMIT, str(tmp_path), str(commit_seconds))
    wait_for_files([str(tmp_path / "ready-rank0")], proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, read_jsonl(str(tmp_path / "logs" / "events.jsonl"))


def test_sigterm_waits_for_the_commit_in_flight_past_grace(tmp_path):
    code, err, events = _stop_during_a_slow_commit(tmp_path, commit_seconds=3, commit_timeout=60)
    assert code == 128 + signal.SIGTERM, err
    assert "--commit-timeout 60s" in err, err  # the bound, printed when the wait begins
    assert "exit code 143" in err and "SIGKILL" not in err.split("restarts:")[1], err
    assert [e for e in events if e["event"] == "checkpoint_committed"], "the final commit was not logged"
    assert "is lost" not in err, err


def test_sigterm_past_the_commit_bound_says_what_was_lost(tmp_path):
    code, err, _ = _stop_during_a_slow_commit(tmp_path, commit_seconds=600, commit_timeout=1)
    assert code == 128 + signal.SIGTERM, err
    summary = next(line for line in err.splitlines() if "FAILED" in line)
    assert "was still being committed after --commit-timeout 1s and is lost" in summary, err
    assert "resumes from the start (no checkpoint committed)" in summary, err
    assert "killed by SIGKILL" in err, err


@pytest.mark.parametrize("script_args", [("group", "exit"), ("group", "wait")])
def test_the_agents_run_directory_is_removed_at_exit(tmp_path, script_args):
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "elastic", "--standalone", "--no-warm-pool", "--grace", "0.5",
                             STARTER, str(tmp_path), *script_args], env=child_env(TMPDIR=str(run_tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_files([str(tmp_path / "ready-rank0")], proc=proc)
        assert [p.name for p in run_tmp.iterdir() if p.name.startswith("elastic-")], "no run directory to test"
        if script_args[1] == "wait":
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert [p.name for p in run_tmp.iterdir() if p.name.startswith("elastic-")] == []
    finally:
        _kill_if_alive(_child(tmp_path))

