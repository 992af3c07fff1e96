"""Goodput accounting from events, as a table: events in, seconds out."""

from __future__ import annotations

import json

import pytest

from elastic.launcher import timeline
from elastic.launcher.goodput import main, summarize


def ev(t: float, kind: str, **fields) -> dict:
    return {"time": t, "event": kind, "node": "n", **fields}


def test_goodput_splits_wall_time_by_cause():
    events = [
        ev(0, "round_sealed", world_size=2), ev(3, "progress", step=1), ev(10, "progress", step=8),
        ev(12, "failure", reason="rank 1 killed by SIGKILL"),  # 2 s after the last step: discarded
        ev(13, "round_sealed", world_size=2), ev(15, "progress", step=9), ev(20, "progress", step=14),
        ev(20, "succeeded"), ev(20, "job_end"),
    ]
    g = summarize(events)
    assert g.wall == 20 and g.steps == 14 and g.rounds == 2
    assert g.useful == pytest.approx(7 + 5)
    assert g.lost == {"start-up": 3, "discarded tail": 2, "failure recovery": 3}
    assert g.failures == ["rank 1 killed by SIGKILL"]
    assert g.ratio == pytest.approx(12 / 20)


def test_checkpoint_commits_and_their_stall_are_counted():
    events = [ev(0, "round_sealed", world_size=2), ev(1, "progress", step=5),
              ev(1.1, "checkpoint_committed", step=5, stall=0.25), ev(2, "progress", step=10),
              ev(2.1, "checkpoint_committed", step=10, stall=0.5), ev(3, "job_end")]
    g = summarize(events)
    assert g.commits == 2 and g.stall == pytest.approx(0.75)
    assert g.checkpoint_step == 10
    assert "checkpoints: 2 committed (newest: step 10), training held 0.75s by their saves" in g.table()


def test_no_progress_means_no_useful_time():
    g = summarize([ev(0, "round_sealed", world_size=1), ev(5, "job_end")])
    assert g.useful == 0 and g.steps == 0 and g.ratio == 0


def test_report_rejects_a_file_that_is_not_an_events_log(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text("not json\n")
    assert main([str(bad)]) == 2
    assert f"{bad}:1: not a JSON line" in capsys.readouterr().err


def recorded_job() -> dict[str, list[dict]]:
    """Two nodes' events of a 20 s job: b flagged a straggler at 6 s, a's worker killed at 10 s."""
    def node(name: str, *events: dict) -> list[dict]:
        return [{**e, "node": name} for e in events]

    common = [ev(0, "round_sealed", world_size=2, round=0), ev(2, "progress", step=1),
              ev(5, "checkpoint_committed", step=10, stall=0.1), ev(9, "progress", step=20)]
    after = [ev(12, "round_sealed", world_size=2, round=1), ev(14, "progress", step=21),
             ev(19, "progress", step=40), ev(19.5, "succeeded"), ev(20, "job_end", ok=True, reason="ok")]
    return {
        "a": node("a", *common, ev(6, "straggler", straggler="b", busy_per_step=0.2, median_others=0.01),
                  ev(10, "failure", reason="rank 0 killed by SIGKILL"), *after),
        "b": node("b", *common, ev(10.5, "round_left", reason="moved on"), *after),
    }


def test_report_draws_each_nodes_timeline_from_a_recorded_events_log(tmp_path, capsys):
    paths = []
    for name, events in recorded_job().items():
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main([str(p) for p in paths] + ["--timeline"]) == 0
    out = capsys.readouterr().out
    assert "stragglers flagged: b" in out and "newest: step 10" in out
    assert timeline.LEGEND in out
    drawn = timeline.render(recorded_job(), width=20)
    assert drawn.splitlines()[1:6] == [
        "a      |--===C====X --======|",
        "  world|22222222222 22222222|",
        "b      |--===CS===- --======|",
        "  world|22222222222 22222222|",
        timeline.LEGEND,
    ]
