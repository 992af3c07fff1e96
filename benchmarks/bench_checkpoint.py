"""Side-by-side: our CheckpointManager vs torch.save/torch.load and DCP on one model+AdamW state.

    python benchmarks/bench_checkpoint.py --size-mb 1024 --dir /tmp/bench-ckpt

Prints wall times and ratios from one run. Everything runs in one process inside a 1-rank
gloo process group (DCP's async_save wants one), on the same state, to local disk. Methods
run in interleaved rounds (os.sync() before each) and the best round counts, which keeps a
shared, noisy machine from favouring whichever method ran in a quiet moment. The page cache
is not dropped between write and read (no permission here), so loads read from memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import CheckpointManager  # noqa: E402
from elastic.host.net import free_port  # noqa: E402

WIDTH = 2048


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def build(size_mb: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Params + AdamW exp_avg + exp_avg_sq ~= size_mb."""
    torch.manual_seed(seed)
    layers = max(1, round(size_mb * 2**20 / 3 / 4 / (WIDTH * WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim


def tensors_of(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {f"model/{k}": v for k, v in get_model_state_dict(model).items()}
    for fqn, entries in get_optimizer_state_dict(model, optim)["state"].items():
        flat.update({f"optim/{fqn}/{n}": v for n, v in entries.items()})
    return flat


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="model + optimizer state size (default 1024)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--saves", type=int, default=20, help="saves in the RSS loop (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench-ckpt-")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    model, optim = build(args.size_mb, seed=0)
    m2, o2 = build(args.size_mb, seed=1)
    flat = tensors_of(model, optim)
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    print(f"state: {nbytes / 2**20:.0f} MiB in {len(flat)} tensors; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; dir {root}; best of {args.repeat} interleaved rounds")
    buffers = {k: torch.empty_like(v) for k, v in flat.items()}
    torch_path = os.path.join(root, "torch.pt")
    dcp_dir, dcp_async_dir = os.path.join(root, "dcp"), os.path.join(root, "dcp-async")
    state = {"model": model, "optim": optim, "step": 0}
    # Like DCP's directories, ours is removed between rounds outside the timing: retention
    # (deleting the previous checkpoint) is not part of a commit. The staging buffer is
    # reused across rounds, as in training; the first save, which allocates it, is reported.
    ckpt = CheckpointManager(os.path.join(root, "ours"))
    first = timed(lambda: ckpt.save(0, state))
    ckpt.wait()

    def dcp_state(m, o):
        return {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}

    def copy() -> dict[str, float]:
        return {"memory copy (preallocated)": timed(lambda: [buffers[k].copy_(v) for k, v in flat.items()]),
                "memory copy (clone, allocating)": timed(lambda: {k: v.clone() for k, v in flat.items()})}

    def torch_save_load() -> dict[str, float]:
        def save() -> None:
            with open(torch_path, "wb") as f:
                torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

        def load_apply() -> None:
            sd = torch.load(torch_path, weights_only=True)
            m2.load_state_dict(sd["model"])
            o2.load_state_dict(sd["optim"])

        out = {"torch.save+fsync": timed(save)}
        out["torch.load"] = timed(lambda: torch.load(torch_path, weights_only=True))
        out["torch.load+load_state_dict"] = timed(load_apply)
        return out

    def dcp_all() -> dict[str, float]:
        shutil.rmtree(dcp_dir, ignore_errors=True)
        shutil.rmtree(dcp_async_dir, ignore_errors=True)
        out = {"DCP save": timed(lambda: dcp.save(dcp_state(model, optim), checkpoint_id=dcp_dir))}
        os.sync()
        start = time.perf_counter()
        future = dcp.async_save(dcp_state(model, optim), checkpoint_id=dcp_async_dir)
        out["DCP async_save blocking"] = time.perf_counter() - start
        future.result()
        out["DCP async_save total"] = time.perf_counter() - start
        target = dcp_state(m2, o2)
        out["DCP load"] = timed(lambda: dcp.load(target, checkpoint_id=dcp_dir))
        return out

    def ours() -> dict[str, float]:
        step = (ckpt.latest() or 0) + 1
        for old in ckpt.steps():
            shutil.rmtree(os.path.join(root, "ours", f"step_{old:012d}"))
        os.sync()
        start = time.perf_counter()
        out = {"ours save() blocking": timed(lambda: ckpt.save(step, state))}
        ckpt.wait()
        out["ours time to commit"] = time.perf_counter() - start
        fresh = {"model": m2, "optim": o2, "step": None}
        out["ours load (into model+optim)"] = timed(lambda: ckpt.load(fresh))
        return out

    rounds: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for method in (copy, torch_save_load, dcp_all, ours):
            os.sync()  # start every method with no dirty pages left by the previous one
            for name, secs in method().items():
                rounds.setdefault(name, []).append(secs)
    results = {name: min(values) for name, values in rounds.items()}
    results["ours save() blocking (first save, allocates staging)"] = first

    ckpt.close()
    ckpt = CheckpointManager(os.path.join(root, "ours-rss"), keep_last=1)
    rss = []
    for i in range(args.saves):
        ckpt.save(1000 + i, state)
        ckpt.wait()
        rss.append(rss_mib())
    ckpt.close()
    shutil.rmtree(root, ignore_errors=True)

    copy = results["memory copy (preallocated)"]
    ref = {
        "ours save() blocking": [("torch.save+fsync", 0.1), ("memory copy (preallocated)", 1.2), ("DCP async_save blocking", None)],
        "ours time to commit": [("DCP save", 1.0), ("DCP async_save total", None), ("torch.save+fsync", None)],
        "ours load (into model+optim)": [("torch.load", 1.0), ("torch.load+load_state_dict", None), ("DCP load", None)],
    }
    print(f"\n{'measure (best round)':<55}{'seconds':>9}{'x copy':>9}")
    for name, secs in results.items():
        print(f"{name:<55}{secs:>9.3f}{secs / copy:>9.2f}")
    print("\nratios (target in brackets)")
    for ours, others in ref.items():
        for other, target_ratio in others:
            ratio = results[ours] / results[other]
            goal = f"  [<= {target_ratio}]" if target_ratio else ""
            print(f"{ours} / {other}: {ratio:.3f}{goal}")
    print(f"\nRSS over {args.saves} saves (MiB): first {rss[0]:.0f}, max {max(rss):.0f}, last {rss[-1]:.0f}; "
          f"every 5th: {[round(r) for r in rss[::5]]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
