"""Chaos on one node: `elastic-run --standalone`, 2 ranks, the loop job, real signals.

Each test injects its faults, lets the supervisor recover, and then checks the promises
against the uninterrupted reference run (see chaos_lib.check_run): final parameters bitwise
equal, every step's samples consumed exactly once, every committed checkpoint readable.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from chaos_lib import STEPS, Run, check_checkpoints, check_run, read_events, recovery, report

pytestmark = pytest.mark.timeout(240)


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
    run = start(runs, Run(tmp_path, flags=("--max-restarts", "3")))
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
