"""Fixtures of the chaos suite: the uninterrupted reference runs, computed once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos_lib import STEPS, Reference, final_params, job_args, read_records  # noqa: E402
from helpers import child_env  # noqa: E402
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
