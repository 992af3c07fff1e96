"""PerRank state: each rank saves its own tensors and JSON and gets them back, on real gloo ranks.

Saved by 2 ranks; loaded by 2 ranks (each rank its own values, bitwise), and at world size
3 and in one process with no group: a clear error naming the entries, or, with
on_resize="keep", the per-rank entries keep their current values and the rest loads.
This file is also the worker script (see test_checkpoint_distributed.py for why it forks).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointManager, CheckpointMismatchError, PerRank

HERE = os.path.abspath(__file__)


def test_per_rank_state_goes_back_to_its_rank(tmp_path, python_env):
    phases = ["save:2", "load:2", "resize:3", "resize:0"]
    proc = subprocess.run(
        [sys.executable, HERE, str(tmp_path / "ckpt"), *phases],
        env=python_env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("per-rank-ok") == 2 + 2 + 3 + 1, proc.stdout


def test_per_rank_on_one_side_only_is_named(tmp_path):
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, {"shared": {"n": 1}, "mine": PerRank({"n": 2})})
        ckpt.wait()
        with pytest.raises(CheckpointMismatchError, match="'mine' was saved per rank; wrap it as PerRank"):
            ckpt.load({"mine": {"n": 0}})
        with pytest.raises(CheckpointMismatchError, match="'shared' was saved as state shared by all ranks"):
            ckpt.load({"shared": PerRank({"n": 0})})
        state = {"shared": None, "mine": PerRank(None, on_resize="keep")}
        assert ckpt.load(state) == 1
        assert state == {"shared": {"n": 1}, "mine": PerRank({"n": 2}, on_resize="keep")}
    with pytest.raises(ValueError, match="on_resize='skip'"):
        PerRank(1, on_resize="skip")


# ---------------------------------------------------------------------------- worker side


def _own(rank: int) -> dict:
    """Rank-specific values, with a shape that differs between ranks too."""
    return {"count": 10 + rank, "buf": torch.arange(100 + rank, dtype=torch.float64) * (rank + 1)}


def _rng_of(rank: int) -> torch.Tensor:
    torch.manual_seed(1000 + rank)
    return torch.get_rng_state()


def _worker(mode: str, url: str) -> None:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.environ['CKPT_TEST_STORE']}", rank=int(os.environ["RANK"]), world_size=world
        )
    rank = dist.get_rank() if world else 0
    torch.manual_seed(0)
    saved_model = torch.nn.Linear(64, 32)  # replicated: the same on every rank
    model = torch.nn.Linear(64, 32)
    with CheckpointManager(url) as ckpt:
        if mode == "save":
            state = {"model": saved_model, "rng": PerRank(_rng_of(rank)), "own": PerRank(_own(rank))}
            ckpt.save(1, state, metrics={"loss": 1.0})
            ckpt.wait()
            manifest = ckpt.manifest(1)
            assert sorted(manifest.state["own"]["__per_rank__"]) == ["0", "1"], manifest.state["own"]
            assert manifest.tensors["own/rank00001/buf"].shape == (101,)
        elif mode == "load":
            state = {
                "model": model,
                "rng": PerRank(torch.zeros_like(torch.get_rng_state())),
                "own": PerRank({"count": -1, "buf": torch.zeros(100 + rank, dtype=torch.float64)}),
            }
            assert ckpt.load(state) == 1
            expected = _own(rank)
            assert state["own"].value["count"] == expected["count"], state["own"]
            assert torch.equal(state["own"].value["buf"], expected["buf"]), f"rank {rank} got another rank's buf"
            assert torch.equal(state["rng"].value, _rng_of(rank))
            assert torch.equal(model.weight, saved_model.weight)
        else:  # resize: world size 3, or one process
            sentinel = torch.full((7,), -1.0)
            state = {"model": model, "rng": PerRank(sentinel.clone()), "own": PerRank({"count": -1})}
            try:
                ckpt.load(state)
            except CheckpointMismatchError as exc:
                message = str(exc)
            else:
                raise AssertionError("loading per-rank state at another world size must fail")
            for name in ("'rng'", "'own'"):
                assert f"{name} was saved per rank by 2 ranks and this job has {max(world, 1)}" in message, message
            assert "on_resize='keep'" in message, message
            state = {
                "model": model,
                "rng": PerRank(sentinel.clone(), on_resize="keep"),
                "own": PerRank({"count": -1}, on_resize="keep"),
            }
            assert ckpt.load(state) == 1
            assert torch.equal(state["rng"].value, sentinel) and state["own"].value == {"count": -1}
            assert torch.equal(model.weight, saved_model.weight)
    if world:
        dist.barrier()
        dist.destroy_process_group()
    print("per-rank-ok", flush=True)


def run_phases(url: str, phases: list[str]) -> int:
    from helpers import fork_ranks

    for phase in phases:
        mode, world = phase.split(":")
        codes = fork_ranks(int(world), lambda: _worker(mode, url), f"{url}-store-{mode}-{world}")
        if any(codes):
            print(f"phase {phase}: exit codes {codes}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_phases(sys.argv[1], sys.argv[2:]))
