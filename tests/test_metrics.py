"""The agent's Prometheus series, served over HTTP (the endpoint during a real run is
scraped in tests/test_status.py); the flags that configure them."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from elastic.errors import ConfigError
from elastic.launcher.cli import build_parser, config_from_args
from elastic.launcher.goodput import Goodput
from elastic.launcher.metrics import Metrics, failure_cause


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_failures_by_cause_goodput_and_histograms_are_served():
    metrics = Metrics(0, run_id="r", node="n1")
    try:
        metrics.failure({"event": "failure", "reason": "rank 1 exited 1", "returncode": 1})
        metrics.failure({"event": "failure", "reason": "rank 0 hung: no step for 30s", "returncode": None})
        metrics.failure({"event": "failure", "reason": "rank 2 hung: no step for 30s", "returncode": None})
        metrics.account(Goodput(wall=10, useful=7.5, lost={"failure recovery": 2.0, "start-up": 0.5}))
        metrics.step_seconds.observe(0.2)
        metrics.save_stall.observe(0.05)
        text = scrape(metrics.port)
    finally:
        metrics.close()
    assert 'elastic_failures_total{cause="worker_exit",node="n1",run_id="r"} 1.0' in text
    assert 'elastic_failures_total{cause="hang",node="n1",run_id="r"} 2.0' in text
    assert 'elastic_goodput_ratio{node="n1",run_id="r"} 0.75' in text
    assert 'elastic_lost_seconds{cause="failure recovery",node="n1",run_id="r"} 2.0' in text
    assert 'elastic_step_seconds_bucket{le="0.25",node="n1",run_id="r"} 1.0' in text
    assert 'elastic_checkpoint_save_stall_seconds_count{node="n1",run_id="r"} 1.0' in text


def test_failure_causes():
    assert failure_cause({"reason": "node b is gone"}) == "node_lost"
    assert failure_cause({"reason": "node b is a straggler: slower than the others"}) == "straggler"
    assert failure_cause({"reason": "something else"}) == "other"


def config(tmp_path, *flags: str):
    script = tmp_path / "train.py"
    script.write_text("")
    return config_from_args(build_parser().parse_args([*flags, str(script)]))


def test_live_flags_reach_the_config(tmp_path):
    c = config(tmp_path, "--metrics-port", "9400", "--straggler-factor", "1.5", "--exclude-stragglers",
               "--straggler_window", "30")
    assert (c.metrics_port, c.straggler_factor, c.exclude_stragglers, c.straggler_window) == (9400, 1.5, True, 30.0)
    c = config(tmp_path)
    assert (c.metrics_port, c.straggler_factor, c.exclude_stragglers) == (None, 2.0, False)


@pytest.mark.parametrize("flags, message", [
    (("--metrics-port", "70000"), "--metrics-port 70000 must be a port number"),
    (("--metrics-port", "x"), "take numbers"),
    (("--straggler-factor", "0.5"), "must be 0 (off) or > 1"),
    (("--rdzv-id", "status"), "'status' is reserved"),
])
def test_bad_live_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path, *flags)


def test_the_grafana_dashboard_queries_only_series_the_agent_serves():
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "elastic-run-dashboard.json").read_text())
    metrics = Metrics(0, run_id="r", node="n")
    try:
        served = {s.name for family in metrics.registry.collect() for s in family.samples}
    finally:
        metrics.close()
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(elastic_[a-z_]+)\b", target["expr"])}
    assert len(dashboard["panels"]) >= 10 and queried
    # Series with a label that has no value yet (failures, lost time) appear once they do.
    assert queried - served <= {"elastic_failures_total", "elastic_lost_seconds"}, queried - served
