"""Fixtures of the chaos suite: the uninterrupted reference runs, computed once per session, and
jobs of several `elastic-run` agents running the loop job."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos_lib import STEPS, Reference, final_params, job_args, read_records  # noqa: E402
from helpers import Job, child_env  # noqa: E402
from loop_launch import Group  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """world size -> Reference: the same job, never interrupted, launched directly (no
    supervisor), with checkpoints on, unpaced. Cached for the session."""
    cache: dict[int, Reference] = {}

    def get(world: int) -> Reference:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"reference-w{world}")
            args = job_args(out, "ref", "--ckpt", str(out / "ckpt"), delay=0)[1:]
            Group(args, world, child_env()).wait_ok(timeout=180)
            ids: dict[int, list[int]] = {}
            for rec in read_records(out, "ref"):
                ids.setdefault(rec["step"], []).extend(rec["ids"])
            assert sorted(ids) == list(range(STEPS))
            cache[world] = Reference(world, final_params(out, "ref"), {s: sorted(v) for s, v in ids.items()})
        return cache[world]

    return get


@pytest.fixture
def loop_job(tmp_path):
    """make(nnodes, endpoint, conf, max_restarts, *worker_args) -> a helpers.Job of the loop job (agents
    started with job.start(node)); every agent still running is killed in teardown."""
    jobs: list[Job] = []

    def make(nnodes: str, endpoint: str, conf: str = "", max_restarts: int = 3, *worker_args: str) -> Job:
        # Steps are slow while tmp_path/slow exists (tests that must not let the job end first).
        args = job_args(tmp_path, "run", "--slow-while", str(tmp_path / "slow"), *worker_args)
        job = Job(endpoint, f"chaos-{uuid.uuid4().hex[:8]}", tmp_path, nnodes, conf, max_restarts,
                  script=args[0], script_args=args[1:],
                  flags=("--checkpoint-dir", str(tmp_path / "ckpt"), "--monitor-interval", "0.05",
                         "--reconfigure"))
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.kill_all()
