"""The agent's memory over a long job: what it keeps of its events (the summary at exit, the
commits it has logged) is a running summary, flat however many events the job produces."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from elastic.launcher.events import EventLog
from elastic.launcher.goodput import summarize
from elastic.launcher.hang_watch import HangLimits, ProgressWatch
from elastic.launcher.run_record import RunRecord
from elastic.rendezvous.protocol import Assignment
from elastic.worker.context import ProgressFile

# 100,000 events: a job of 14 hours at 2 progress events/s. The check below allows 64 KiB of
# growth over the 90,000 events after the warm-up, under 0.75 bytes an event: keeping anything
# per event (a pointer alone is 8 bytes) fails it ten times over. Rounds and commits come as
# often as needed for 10 rounds and 1,000 commits, so what is kept per round or per commit is
# measured over as many of them as in a longer job.
EVENTS = 100_000
ROUND_EVERY = EVENTS // 10  # a restart now and then
COMMIT_EVERY = EVENTS // 1_000  # a checkpoint commit, seen through a real progress file


class Job:
    """An agent's record of a long job, fed as the agent feeds it: progress events (2/s in a
    real job), and every COMMIT_EVERY steps a commit read from the rank's progress file."""

    def __init__(self, tmp_path) -> None:
        path = str(tmp_path / "rank0.progress")
        self.events = EventLog(None, run_id="long", node_id="n0")  # no --log-dir: kept only in memory, if at all
        self.record = RunRecord(self.events)
        self.watch = ProgressWatch({0: path}, HangLimits())
        self.rank = ProgressFile(path)
        self.step = 0

    def feed(self, count: int) -> None:
        for _ in range(count):
            self.step += 1
            step, at = self.step, 1_000.0 + self.step * 0.5
            if step % ROUND_EVERY == 1:
                self.record.round_sealed(Assignment(step // ROUND_EVERY, 0, 1, 1, 0, "127.0.0.1", 1, 0))
            elif step % COMMIT_EVERY == 0:
                self.rank.commit(step, 0.01)
                self.watch.read()
                self.record.progress(self.watch, step // ROUND_EVERY)  # logs the commit once
            else:
                self.events.emit("progress", at=at, round=step // ROUND_EVERY, step=step)


def traced() -> int:
    """Bytes allocated and alive (cyclic garbage collected first: it is not kept, only late)."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_a_long_job_s_events_leave_the_agent_s_memory_flat(tmp_path):
    job = Job(tmp_path)
    tracemalloc.start()
    try:
        job.feed(EVENTS // 10)  # warm-up: every kind of event seen, buffers at their size
        before = traced()
        job.feed(EVENTS - EVENTS // 10)
        after = traced()
    finally:
        tracemalloc.stop()
    job.rank.close()
    # 90,000 more events kept would be tens of MB; a running summary stays where it was.
    assert after - before < 64 * 1024, f"the agent grew by {after - before} bytes over {EVENTS} events"
    result = job.record.finish(ok=True, reason="done", code=0)
    assert result.rounds == EVENTS // ROUND_EVERY and result.goodput.rounds == EVENTS // ROUND_EVERY
    assert result.goodput.steps == EVENTS - 1  # the last progress event; the last event is a commit
    assert result.goodput.commits == EVENTS // COMMIT_EVERY and job.record.newest_commit == EVENTS
    assert result.goodput.stall == pytest.approx(0.01 * EVENTS // COMMIT_EVERY)


TIMELINE = [(0, "round_sealed", {}), (3, "progress", {"step": 1}), (10, "progress", {"step": 8}),
            (10.5, "checkpoint_committed", {"step": 8, "stall": 0.2}),
            (12, "failure", {"reason": "rank 1 killed by SIGKILL"}), (13, "round_sealed", {}),
            (15, "progress", {"step": 9}), (16, "round_left", {}), (17, "round_sealed", {}),
            (18, "progress", {"step": 10}), (20, "progress", {"step": 14}), (20, "succeeded", {}),
            (21, "job_end", {})]


def test_the_running_summary_equals_the_report_of_the_same_events():
    log = EventLog(None, run_id="r", node_id="n")
    for at, kind, fields in TIMELINE:
        log.emit(kind, at=at, **fields)
    running = log.goodput()
    assert running == summarize([{"time": at, "event": kind, **fields} for at, kind, fields in TIMELINE])
    assert running.useful == 7 + 0 + 2 and running.failures == ["rank 1 killed by SIGKILL"]
