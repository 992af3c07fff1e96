"""Hang judgement from progress files: fixed and calibrated limits (real files, a set clock)."""

import time

import pytest

from elastic.errors import ConfigError
from elastic.launcher.config import parse_hang
from elastic.exchange.progress import Commit, Progress
from elastic.launcher.hang_watch import HangLimits, ProgressWatch
from helpers import wait_until


class Rank:
    """One rank's progress file, with chosen step times."""

    def __init__(self, path):
        self.path = str(path)

    def step(self, step: int, at: float) -> None:
        with open(self.path, "wb") as f:
            f.write(Progress(step, at).encode())


def watch_of(tmp_path, limits, name="rank0"):
    now = [0.0]
    rank = Rank(tmp_path / f"{name}.progress")
    return ProgressWatch({0: rank.path}, limits, clock=lambda: now[0]), rank, now


def run_steps(watch, rank, now, times, first=1):
    """The rank completes steps first, first+1, ... at `times`; the agent reads after each."""
    for step, at in enumerate(times, start=first):
        rank.step(step, at)
        now[0] = at
        watch.read()


def test_fixed_limit_ignores_step_times(tmp_path):
    watch, rank, now = watch_of(tmp_path, HangLimits(timeout=5.0))
    run_steps(watch, rank, now, [1.0, 1.1, 1.2, 1.3, 1.4])
    now[0] = 6.3
    assert watch.hung() == []
    now[0] = 6.5
    assert [h.reason for h in watch.hung()] == ["no step for 5s after step 5"]


def test_calibrated_limit_is_factor_times_slowest_step_within_floor_and_ceiling(tmp_path):
    watch, rank, now = watch_of(tmp_path, HangLimits(timeout=300.0, factor=10.0, floor=1.0))
    run_steps(watch, rank, now, [1.0, 1.1, 1.3, 1.4, 1.5])  # slowest step: 0.2 s -> limit 2 s
    now[0] = 1.5 + 1.9
    assert watch.hung() == []
    now[0] = 1.5 + 2.1
    (hang,) = watch.hung()
    assert hang.reason == "no step for 2s after step 5 (calibrated: 10 x its slowest step, 0.2s)"

    floored, rank, now = watch_of(tmp_path, HangLimits(timeout=300.0, factor=10.0, floor=30.0), "floored")
    run_steps(floored, rank, now, [1.0, 1.1, 1.2, 1.3])
    now[0] = 1.3 + 29.0
    assert floored.hung() == []  # 10 x 0.1 s is 1 s, but never less than the floor
    now[0] = 1.3 + 31.0
    assert "no step for 30s" in floored.hung()[0].reason


def test_calibration_waits_for_enough_steps_and_never_exceeds_the_fixed_timeout(tmp_path):
    watch, rank, now = watch_of(tmp_path, HangLimits(timeout=50.0, factor=10.0, floor=1.0))
    run_steps(watch, rank, now, [1.0, 1.1])  # one timed step: not enough to judge by
    now[0] = 1.1 + 45.0
    assert watch.hung() == []
    run_steps(watch, rank, now, [50.0, 50.1, 50.2], first=3)  # a 48.9 s step: 10x is 489 s, capped at 50
    now[0] = 50.2 + 49.0
    assert watch.hung() == []
    now[0] = 50.2 + 51.0
    assert "no step for 50s" in watch.hung()[0].reason


def test_steps_seen_between_two_reads_are_averaged(tmp_path):
    watch, rank, now = watch_of(tmp_path, HangLimits(timeout=300.0, factor=10.0, floor=0.1))
    rank.step(1, 1.0)
    now[0] = 1.0
    watch.read()
    rank.step(5, 2.0)  # four steps in one second between two reads: 0.25 s each
    now[0] = 2.0
    watch.read()
    now[0] = 2.0 + 2.6
    assert "no step for 2.5s" in watch.hung()[0].reason


@pytest.mark.parametrize("text, expected", [
    ("120", HangLimits(timeout=120.0, first_step_timeout=600.0)),
    ("0", HangLimits(timeout=0.0, first_step_timeout=600.0)),
    ("auto", HangLimits(factor=10.0, floor=30.0)),
    ("auto:5", HangLimits(factor=5.0, floor=30.0)),
    ("auto:5:2", HangLimits(factor=5.0, floor=2.0)),
])
def test_parse_hang(text, expected):
    assert parse_hang(text, 600.0) == expected


@pytest.mark.parametrize("text", ["soon", "auto:x", "auto:1", "auto:10:0", "5:3"])
def test_parse_hang_rejects_bad_values_with_the_accepted_forms(text):
    with pytest.raises(ConfigError, match=r"auto\[:FACTOR\[:MIN_SECONDS\]\]"):
        parse_hang(text, 600.0)


def test_commits_are_reported_once_every_rank_has_seen_them(tmp_path):
    """Several commits may land between two reads (a final save right after a periodic one):
    each is reported, with the longest stall among the ranks, once every rank has seen it."""
    paths = {r: str(tmp_path / f"rank{r}.progress") for r in (0, 1)}
    watch = ProgressWatch(paths, HangLimits())

    def write(rank, *commits):
        with open(paths[rank], "wb") as f:
            f.write(Progress(10, 1.0, 0, tuple(Commit(s, float(s), stall) for s, stall in commits)).encode())

    write(0, (5, 0.1), (10, 0.2))
    write(1, (5, 0.3))
    watch.read()
    assert watch.committed() == [Commit(5, 5.0, 0.3)]  # rank 1 has not seen 10 yet
    write(1, (5, 0.3), (10, 0.1))
    watch.read()
    assert watch.committed() == [Commit(5, 5.0, 0.3), Commit(10, 10.0, 0.2)]


def test_a_parked_rank_is_not_hung_and_the_watch_sees_who_can_be_reconfigured(tmp_path):
    """Records written by elastic.worker.context's ProgressFile: a TrainLoop declares itself
    reconfigurable, then parks at step 3 and waits, making no step, for its next round."""
    from elastic.worker.context import ProgressFile

    now = [100.0]
    path = str(tmp_path / "rank0.progress")
    watch = ProgressWatch({0: path}, HangLimits(timeout=5.0), clock=lambda: now[0])
    progress = ProgressFile(path)
    progress.write(3)
    watch.read()
    assert not watch.reconfigurable() and not watch.parked()  # a plain script says neither
    progress.declare_reconfigurable()
    progress.park(3)
    progress.close()
    watch.read()
    assert watch.reconfigurable() and watch.parked()
    now[0] += 60.0
    assert watch.hung() == []


@pytest.mark.parametrize("shift", [-3600.0, 3600.0])
def test_a_wall_clock_step_in_the_worker_neither_fakes_nor_hides_a_hang(tmp_path, monkeypatch, shift):
    """The worker's wall clock is an hour off the agent's (an NTP step between the two
    reads, or in one process only): a rank making steps is not hung, one that stopped is."""
    from elastic.worker.context import ProgressFile

    path = str(tmp_path / "rank0.progress")
    watch = ProgressWatch({0: path}, HangLimits(timeout=0.3, first_step_timeout=0.3))  # the agent's own clock
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + shift)  # the NTP step: only the wall clock moves
    progress = ProgressFile(path)
    progress.write(1)
    monkeypatch.setattr(time, "time", real_time)
    watch.read()
    assert watch.hung() == []  # it just made a step, whatever its wall clock says
    def judged() -> list:  # no more steps: hung 0.3 s after the one it made
        watch.read()
        return watch.hung()

    assert [h.reason for h in wait_until("the hang", judged, 10.0)] == ["no step for 0.3s after step 1"]
    progress.close()
