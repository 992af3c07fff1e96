"""Chaos on one node: `elastic-run --standalone`, 2 ranks, the loop job, real signals.

Each test injects its faults, lets the supervisor recover, and then checks the promises
against the uninterrupted reference run (see chaos_lib.check_run): final parameters bitwise
equal, every step's samples consumed exactly once, every committed checkpoint readable.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time

import pytest

from chaos_lib import (SAVE_EVERY, STEPS, Run, check_checkpoints, check_run, read_events, recovery, report,
                       wait_until)

pytestmark = pytest.mark.timeout(600)

# A node that fails twice waits cooldown_base (10 s by default) before it is admitted again,
# even when it is the only node and nothing could replace it. The chaos tests fail the same
# node on purpose, so they shorten the cooldown rather than wait it out.
FAST_COOLDOWN = ("--rdzv-conf", "cooldown_base=0.2")


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:
        run.stop()


def start(runs: list[Run], run: Run) -> Run:
    runs.append(run)
    return run.start()


def test_random_sigkills_of_random_ranks(tmp_path, reference, runs):
    """Two SIGKILLs, of a seeded random rank at a seeded random step each; the supervisor
    restarts the group at the same world size and the job ends bitwise equal."""
    rng = random.Random(8)
    run = start(runs, Run(tmp_path, flags=("--max-restarts", "3", *FAST_COOLDOWN)))
    times = []
    first = None
    for attempt in range(2):
        # The second kill lands at least 3 steps after the first: the same rank killed at the
        # same step twice would (rightly) be judged a deterministic failure and not retried.
        low = 2 if first is None else first + 3
        step, rank = rng.randint(low, low + 6), rng.randint(0, 1)
        record = run.wait_step(step, restart=attempt, rank=rank)
        fault = run.kill_rank(record)
        first = record["step"]
        run.wait_event("workers_started", round=attempt + 1)
        times.append((fault, attempt + 1, record["step"], rank))
    assert run.finish() == 0, run.output()[-3000:]
    events, records = run.events(), run.records()
    for fault, restart, step, rank in times:
        report("random-sigkill", rank=rank, step=step, **recovery(events, records, fault, restart))
    assert [e["event"] for e in events].count("failure") == 2
    check_run(tmp_path, "run", run.ckpt_dir, reference(2))


def test_sigterm_preemption_then_resume(tmp_path, reference, runs):
    """SIGTERM to elastic-run: every rank stops after the same step S, saves S, exits 143;
    a second elastic-run on the same checkpoint dir resumes from S and ends bitwise equal."""
    first = start(runs, Run(tmp_path, tag="a", name="a", flags=("--grace", "20")))
    first.wait_step(8)
    sent = time.time()
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 128 + signal.SIGTERM, first.output()[-3000:]
    records = first.records()
    saved = check_checkpoints(first.ckpt_dir, expect_latest=None)[-1]
    last = {r: max(x["step"] for x in records if x["rank"] == r) for r in (0, 1)}
    assert last[0] == last[1] == saved - 1, (last, saved)  # both stopped after step S, S saved
    assert saved < STEPS
    stopped = read_events(first.log_dir / "events.jsonl")
    assert stopped[-1]["event"] == "job_end" and stopped[-1]["exit_code"] == 143

    second = start(runs, Run(tmp_path, tag="b", name="b"))
    assert second.finish() == 0, second.output()[-3000:]
    resumed = min(r["step"] for r in second.records())
    assert resumed == saved
    assert f"resumed {saved}" in second.output()
    report("sigterm-preemption", saved_step=saved, stop_s=round(stopped[-1]["time"] - sent, 2),
           resume_first_step_s=round(min(r["t"] for r in second.records()) - second.started, 2))
    check_run(tmp_path, "b", second.ckpt_dir, reference(2), tags=("a", "b"))


def in_flight_save(ckpt_dir, min_step: int):
    """A step directory whose shard files are all written but whose manifest is not: a save
    in flight, between durability of the data and the commit."""
    for step_dir in sorted(ckpt_dir.glob("step_*")):
        step = int(step_dir.name.split("_")[1])
        shards = {p.name.split("-")[0] for p in step_dir.glob("rank*.safetensors")}
        if step >= min_step and len(shards) == 2 and not (step_dir / "manifest.json").exists():
            return step
    return None


def test_kill_during_checkpoint_write(tmp_path, reference, runs):
    """Rank 0 is SIGKILLed while the async save of step S is in flight (files written, the
    manifest commit not yet): S is never committed, the restart resumes from the previous
    committed step, the leftover is ignored and later replaced, and the job ends bitwise."""
    # --slow-commit holds the commit of every save of the first attempt for 2 s.
    run = start(runs, Run(tmp_path, flags=("--max-restarts", "2"), worker_args=("--slow-commit", "2")))
    step = wait_until("a save in flight", lambda: in_flight_save(run.ckpt_dir, 6), 240, alive=run.dead)
    victim = next(r for r in run.records() if r["rank"] == 0 and r["restart"] == 0)
    fault = run.kill_rank(victim)
    committed = check_checkpoints(run.ckpt_dir, expect_latest=None)
    assert step not in committed and committed[-1] == step - SAVE_EVERY, (step, committed)
    assert run.finish() == 0, run.output()[-3000:]
    records = run.records()
    resumed = min(r["step"] for r in records if r["restart"] == 1)
    assert resumed == step - SAVE_EVERY  # the uncommitted step was not trusted
    report("kill-during-checkpoint-write", step=step, resumed=resumed,
           **recovery(run.events(), records, fault, 1))
    check_run(tmp_path, "run", run.ckpt_dir, reference(2))


def test_sigstop_in_a_collective_is_detected_as_a_hang(tmp_path, reference, runs):
    """Rank 1 is SIGSTOPped mid-run; rank 0 blocks in the next all-reduce. The agent sees no
    progress for --hang-timeout, dumps stacks, kills both and restarts: bitwise."""
    run = start(runs, Run(tmp_path, flags=("--max-restarts", "2", "--hang-timeout", "4",
                                           "--first-step-timeout", "200")))
    record = run.wait_step(6, rank=1)
    fault = run.kill_rank(record, signal.SIGSTOP)
    failure = run.wait_event("failure", round=0)
    assert "hung" in failure["reason"], failure
    assert run.finish() == 0, run.output()[-3000:]
    report("sigstop-hang", step=record["step"], **recovery(run.events(), run.records(), fault, 1))
    check_run(tmp_path, "run", run.ckpt_dir, reference(2))


def test_second_fault_during_recovery(tmp_path, reference, runs):
    """Rank 1 is killed; as soon as the restarted workers are spawned (before their first
    step) rank 0 of the new group is killed too. The second restart finishes bitwise."""
    run = start(runs, Run(tmp_path, flags=("--max-restarts", "3", *FAST_COOLDOWN)))
    fault = run.kill_rank(run.wait_step(4, rank=1))
    spawned = run.wait_event("workers_started", round=1)
    second = time.time()
    os.kill(spawned["pids"][0], signal.SIGKILL)
    assert run.finish() == 0, run.output()[-3000:]
    records = run.records()
    assert not [r for r in records if r["restart"] == 1], "the second fault came after a first step"
    failures = [e for e in run.events() if e["event"] == "failure"]
    assert [f["round"] for f in failures] == [0, 1], failures
    report("second-fault-during-recovery", first_fault=recovery(run.events(), records, fault, 2),
           from_second_fault=recovery(run.events(), records, second, 2))
    check_run(tmp_path, "run", run.ckpt_dir, reference(2))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted on a temporary directory (unmounted in teardown)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory) -> int:
    """Write a file until the filesystem is full; return the bytes written."""
    written, chunk = 0, b"\0" * 4096
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def test_disk_full_in_checkpoint_dir(tmp_path, reference, runs, small_disk):
    """The checkpoint filesystem fills up mid-run. The failed save is never committed (nothing
    half-written is listed or loaded); the rank raises an error that names the problem
    (StorageError ... [Errno 28] No space left on device, with the file); the restart resumes
    from the last committed step and hits the same full disk. The third such failure is the
    same error (OSError ENOSPC, whichever rank, file or step hit it) with no newer checkpoint
    committed in between (--same-failure-limit, default 3), so elastic-run stops there, with a message that says what to do,
    although the budget (5 restarts) would allow more. With space freed, the next
    elastic-run resumes and ends bitwise."""
    ckpt = small_disk / "ckpt"
    run = start(runs, Run(tmp_path, tag="a", name="a", ckpt_dir=ckpt, flags=("--max-restarts", "5")))
    wait_until("a committed step >= 6", lambda: (ckpt.exists() and any(
        (d / "manifest.json").exists() and int(d.name.split("_")[1]) >= 6 for d in ckpt.glob("step_*"))),
        240, alive=run.dead)
    filled_at = time.time()
    fill(small_disk)
    assert run.finish() == 1, run.output()[-3000:]
    events = run.events()
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 3 and all("No space left on device" in f["reason"] for f in failures), failures
    assert [e["event"] for e in events].count("restart") == 2  # stopped at the third (--same-failure-limit 3)
    reason = events[-1]["reason"]
    assert events[-1]["event"] == "job_end" and reason.startswith(failures[-1]["reason"]), events[-1]
    for part in ("again, with no newer checkpoint to resume from",
                 "the checkpoint directory's filesystem is full (ENOSPC)",
                 "free space or point --checkpoint-dir elsewhere"):
        assert part in reason, reason
    assert reason in run.output()  # the summary says it too
    committed = check_checkpoints(ckpt, expect_latest=None)  # every listed step reads back
    report("disk-full", committed=committed, failures=len(failures),
           stopped_after_s=round(events[-1]["time"] - filled_at, 2), reason=reason[-160:])

    (small_disk / "filler").unlink()
    second = start(runs, Run(tmp_path, tag="b", name="b", ckpt_dir=ckpt))
    assert second.finish() == 0, second.output()[-3000:]
    assert min(r["step"] for r in second.records()) == committed[-1]
    check_run(tmp_path, "b", ckpt, reference(2), tags=("a", "b"))
