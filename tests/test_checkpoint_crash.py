"""Crash safety: SIGKILL a saving process at many points; the latest committed checkpoint loads.

A fresh interpreter imports torch once, then forks one saver per kill point. Each saver
counts calls to a filesystem primitive (os.fsync, os.link, os.remove) and SIGKILLs itself
right before the k-th call, i.e. between two steps of the write/commit/retention protocol.
The parent then checks that every committed checkpoint verifies and that the latest loads
bitwise equal to what was saved at that step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

HERE = os.path.abspath(__file__)
POINTS = [("fsync", k) for k in (1, 2, 3, 4, 5, 7, 10, 13)] + [("link", k) for k in (1, 2, 3)] + [
    ("remove", k) for k in (1, 2)
]


def test_sigkill_at_every_protocol_point(tmp_path, python_env):
    proc = subprocess.run([sys.executable, HERE, str(tmp_path)], env=python_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(POINTS), proc.stdout


def values(step: int):
    import torch

    return torch.arange(20_000, dtype=torch.float32) * step, torch.full((7, 3), step, dtype=torch.int64)


def saver(root: str, primitive: str, k: int) -> None:
    from checkpoint import CheckpointManager

    calls = [0]
    original = getattr(os, primitive)

    def fault(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(os, primitive, fault)
    ckpt = CheckpointManager(root, keep_last=2)
    for step in range(1, 7):
        w, b = values(step)
        ckpt.save(step, {"w": w, "b": b, "meta": {"step": step}})
    ckpt.close()


def check(root: str) -> int | None:
    import torch

    from checkpoint import CheckpointManager

    ckpt = CheckpointManager(root)
    for step in ckpt.steps():
        ckpt.verify(step)
    state = {"w": torch.zeros(20_000), "b": torch.zeros(7, 3, dtype=torch.int64), "meta": None}
    loaded = ckpt.load(state)
    if loaded is not None:
        w, b = values(loaded)
        assert torch.equal(state["w"], w) and torch.equal(state["b"], b), f"step {loaded} differs"
        assert state["meta"] == {"step": loaded} and loaded == ckpt.latest()
    return loaded


def main(base: str) -> int:
    import torch  # noqa: F401  (imported before forking so each saver starts fast)

    import checkpoint  # noqa: F401

    for primitive, k in POINTS:
        root = os.path.join(base, f"{primitive}-{k}")
        pid = os.fork()
        if pid == 0:
            try:
                saver(root, primitive, k)
            finally:
                os._exit(3)  # reached only if the kill point was never hit
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            print(f"kill point {primitive}#{k} was never reached (status {status})")
            return 1
        print(f"ok {primitive}#{k}: latest loadable step {check(root)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
