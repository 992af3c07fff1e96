"""Save on 2 ranks, load on 1 (no process group), 3 and 4: DDP and FSDP2, bitwise.

Real processes and real gloo process groups. This file is also the worker: the test runs it
as a script that forks the ranks with RANK/WORLD_SIZE/MASTER_* set, as torchrun would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

HERE = os.path.abspath(__file__)
KINDS = ("ddp", "fsdp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_save_on_2_load_on_1_3_4_bitwise(tmp_path, python_env):
    # One interpreter imports torch once and forks every rank of every phase: a fresh
    # interpreter per rank costs ~4 s of imports each on this shared 2-core machine.
    phases = ["save:2", "load:0", "load:3", "load:4"]
    proc = subprocess.run(
        [sys.executable, HERE, f"{tmp_path}/ckpt", str(tmp_path / "ref"), *phases],
        env=python_env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("loaded-ok") == 1 + 3 + 4, proc.stdout


def run_phases(url: str, ref: str, phases: list[str]) -> int:
    """Fork the ranks of each phase ("mode:world"; world 0 = no process group), in order."""
    import multiprocessing
    import traceback

    import torch  # noqa: F401  (imported once here, inherited by every forked rank)

    import checkpoint  # noqa: F401

    ctx = multiprocessing.get_context("fork")

    def rank_main(mode: str, world: int, rank: int, port: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            _worker(mode, url, ref)
        except BaseException:  # report and fail this rank; the parent checks exit codes
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)

    for phase in phases:
        mode, world = phase.split(":")
        port = free_port()
        procs = [ctx.Process(target=rank_main, args=(mode, int(world), r, port)) for r in range(max(int(world), 1))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        codes = [p.exitcode for p in procs]
        if codes != [0] * len(procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            print(f"phase {phase}: exit codes {codes}", flush=True)
            return 1
    return 0


# ---------------------------------------------------------------------------- worker side


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
        dist.init_process_group("gloo")
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
                ckpt.wait()
                reference = full(model, optim)
                if rank == 0:
                    save_file(reference, f"{ref}-{kind}.safetensors")
                    m = ckpt.manifest(2)
                    assert m.world_size == 2 and len(m.files) == 2, m.files
            else:
                state = {"model": model, "optim": optim, "meta": None}
                assert ckpt.load(state) == 2
                assert state["meta"] == {"epoch": 1}
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
