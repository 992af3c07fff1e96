"""TrainLoop across real processes (gloo, float64): world sizes, FSDP2, preemption."""

from __future__ import annotations

import json
import math
import signal
import subprocess

import pytest
import torch

from elastic.sampler import ElasticSampler
from loop_launch import finish, launch, run_ok

G, M, STEPS = 7, 1, 12


def records(out, tag, world):
    """step -> list of (world, A, ids concatenated over ranks in rank order), one per run."""
    by_rank = []
    for r in range(world):
        with open(out / f"ids.{tag}.rank{r}.jsonl") as f:
            by_rank.append([json.loads(line) for line in f])
    steps = {}
    for rows in zip(*by_rank):
        assert len({row["step"] for row in rows}) == 1, rows
        steps[rows[0]["step"]] = (rows[0]["world"], rows[0]["A"], [i for row in rows for i in row["ids"]])
    return steps


def params(out, tag):
    return torch.load(out / f"params.{tag}.pt")


def expected_ids(step):
    return list(ElasticSampler(30, G, seed=5).samples(step).ids)


def test_world_sizes_1_2_3_see_the_same_samples_and_end_within_1e7(tmp_path, python_env):
    """The same global batches at every world size, A = ceil(G/(m*W)), and the same model."""
    groups = {
        w: launch(["--out", str(tmp_path), "--tag", f"w{w}", "--max-steps", str(STEPS)], w,
                  python_env, torchrun_env=w > 1)  # w=1: a plain process with no launcher env
        for w in (1, 2, 3)
    }
    for w, procs in groups.items():
        for rank, (rc, out, err) in enumerate(finish(procs)):
            assert rc == 0, f"w={w} rank {rank}: {err[-3000:]}"
    reference = params(tmp_path, "w1")
    for w in (1, 2, 3):
        steps = records(tmp_path, f"w{w}", w)
        assert sorted(steps) == list(range(STEPS))
        for s, (world, a, ids) in steps.items():
            assert world == w and a == math.ceil(G / (M * w))
            assert ids == expected_ids(s), f"w={w} step {s}"
        got = params(tmp_path, f"w{w}")
        for k in reference:
            torch.testing.assert_close(got[k], reference[k], rtol=0, atol=1e-7)


def test_fsdp2_matches_ddp(tmp_path, python_env):
    args = ["--out", str(tmp_path), "--max-steps", "6", "--micro-batch", "2"]
    ddp = launch([*args, "--tag", "ddp"], 2, python_env)
    fsdp = launch([*args, "--tag", "fsdp", "--fsdp"], 2, python_env)
    for procs in (ddp, fsdp):
        for rank, (rc, out, err) in enumerate(finish(procs)):
            assert rc == 0, f"rank {rank}: {err[-3000:]}"
    a, b = params(tmp_path, "ddp"), params(tmp_path, "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-7)
    assert records(tmp_path, "fsdp", 2) == records(tmp_path, "ddp", 2)
