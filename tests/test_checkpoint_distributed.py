"""Save on 2 ranks, load on 1 (no process group), 3 and 4: DDP and FSDP2, bitwise.

Also: a corrupt chunk seen by some ranks makes all ranks fall back together, and a commit
guard raising on rank 0 stops the commit everywhere.

Real processes and real gloo process groups. This file is also the worker: the test runs it
as a script that forks the ranks with RANK/WORLD_SIZE set, as torchrun would. The ranks meet
through a FileStore in the test's directory instead of a "free" TCP port, which another
process on this shared machine could take between choosing and binding it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

HERE = os.path.abspath(__file__)
KINDS = ("ddp", "fsdp")


def test_save_on_2_load_on_1_3_4_bitwise(tmp_path, python_env):
    # One interpreter imports torch once and forks every rank of every phase: a fresh
    # interpreter per rank costs ~4 s of imports each on this shared 2-core machine.
    phases = ["save:2", "corrupt:0", "load:0", "load:3", "load:4"]
    proc = subprocess.run(
        [sys.executable, HERE, f"{tmp_path}/ckpt", str(tmp_path / "ref"), *phases],
        env=python_env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("loaded-ok") == 1 + 3 + 4, proc.stdout


def run_phases(url: str, ref: str, phases: list[str]) -> int:
    """Fork the ranks of each phase ("mode:world"; world 0 = no process group), in order."""
    import torch  # noqa: F401  (imported once here, inherited by every forked rank)

    import checkpoint  # noqa: F401
    from helpers import fork_ranks

    for phase in phases:
        mode, world = phase.split(":")
        if mode == "corrupt":
            corrupt_fsdp_step3(url)
            continue
        store = f"{url}-store-{phase.replace(':', '-')}"
        codes = fork_ranks(int(world), lambda: _worker(mode, url, ref), store)
        if any(codes):
            print(f"phase {phase}: exit codes {codes}", flush=True)
            return 1
    return 0


# ---------------------------------------------------------------------------- worker side


class StaleRound(Exception):
    pass


def check_fenced_commit(ckpt, model, optim, rank: int) -> None:
    """A commit guard raising on rank 0 stops the commit on every rank."""
    from checkpoint import CheckpointError

    def stale() -> None:
        raise StaleRound("round 1 is stale; the current round is 2")

    ckpt.set_commit_guard(stale)
    ckpt.save(4, {"model": model, "optim": optim, "meta": {"epoch": 4}})
    expected = StaleRound if rank == 0 else CheckpointError
    try:
        ckpt.wait()
    except expected as exc:
        assert "round 1 is stale" in str(exc), exc
    else:
        raise AssertionError("a fenced commit must fail on every rank")
    ckpt.set_commit_guard(None)
    assert ckpt.steps() == [2, 3], ckpt.steps()


def corrupt_fsdp_step3(url: str) -> None:
    """Flip a byte of the emb.weight rows saved by rank 1: at 3-4 ranks only some read them."""
    import json

    step_dir = f"{url}-fsdp/step_000000000003"
    with open(f"{step_dir}/manifest.json") as f:
        manifest = json.load(f)
    (chunk,) = [c for c in manifest["tensors"]["model/emb.weight"]["chunks"] if c["file"].startswith("rank00001")]
    assert chunk["offsets"] == [300, 0], chunk
    with open(f"{step_dir}/{chunk['file']}", "r+b") as f:
        f.seek(chunk["begin"])
        first = f.read(1)
        f.seek(chunk["begin"])
        f.write(bytes([first[0] ^ 0xFF]))


def _worker(mode: str, url: str, ref: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from checkpoint import CheckpointManager

    world = int(os.environ["WORLD_SIZE"])
    if world:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.environ['CKPT_TEST_STORE']}", rank=int(os.environ["RANK"]), world_size=world
        )
    rank = dist.get_rank() if world else 0

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(600, 512)  # > 1 MiB: replicated state is cut in blocks
            self.a = torch.nn.Linear(512, 7)
            self.b = torch.nn.Linear(7, 5)

        def forward(self, idx):
            return self.b(torch.relu(self.a(self.emb(idx))))

    def build(kind: str, seed: int):
        torch.manual_seed(seed)
        net = Net()
        if kind == "fsdp" and world:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            fully_shard(net.a, mesh=mesh)
            fully_shard(net, mesh=mesh)
            wrapped = net
        else:
            wrapped = DistributedDataParallel(net) if world else net
        optim = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        return wrapped, optim

    def full(model, optim) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True)
        flat = {f"model/{k}": v for k, v in get_model_state_dict(model, options=opts).items()}
        osd = get_optimizer_state_dict(model, optim, options=opts)
        for fqn, entries in osd["state"].items():
            for name, value in entries.items():
                flat[f"optim/{fqn}/{name}"] = value
        return {k: v.detach().clone().contiguous() for k, v in flat.items()}

    for kind in KINDS:
        if kind == "fsdp" and not world and mode == "save":
            continue
        model, optim = build(kind, seed=0 if mode == "save" else 1000 + rank)
        with CheckpointManager(f"{url}-{kind}") as ckpt:
            if mode == "save":
                for it in range(2):
                    torch.manual_seed(100 * it + rank)  # different data per rank
                    model(torch.randint(0, 600, (8,))).sum().backward()
                    optim.step()
                    optim.zero_grad()
                ckpt.save(2, {"model": model, "optim": optim, "meta": {"epoch": 1}}, metrics={"loss": 1.0})
                ckpt.save(3, {"model": model, "optim": optim, "meta": {"epoch": 3}}, metrics={"loss": 1.0})
                ckpt.wait()
                reference = full(model, optim)
                if rank == 0:
                    save_file(reference, f"{ref}-{kind}.safetensors")
                    m = ckpt.manifest(2)
                    assert m.world_size == 2 and len(m.files) == 2, m.files
                if kind == "ddp":
                    check_fenced_commit(ckpt, model, optim, rank)
            else:
                # The parent corrupted rows 300-599 of the FSDP emb.weight of step 3: only the
                # ranks that hold those rows see it, yet all must fall back together.
                state = {"model": model, "optim": optim, "meta": None}
                expected_step = 2 if kind == "fsdp" else 3
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loaded = ckpt.load(state)
                assert loaded == expected_step, (kind, world, loaded, ckpt.steps(), [str(w.message) for w in caught])
                assert state["meta"] == {"epoch": expected_step if expected_step == 3 else 1}
                fell_back = [w for w in caught if "falling back" in str(w.message)]
                assert len(fell_back) == (kind == "fsdp"), [str(w.message) for w in caught]
                expected = load_file(f"{ref}-{kind}.safetensors")
                got = full(model, optim)
                assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
                for k in expected:
                    assert torch.equal(got[k], expected[k]), f"{kind} {k} differs at world {world}"
    if world:
        dist.barrier()
        dist.destroy_process_group()
    print("loaded-ok" if mode == "load" else "saved-ok", flush=True)


if __name__ == "__main__":
    sys.exit(run_phases(sys.argv[1], sys.argv[2], sys.argv[3:]))
