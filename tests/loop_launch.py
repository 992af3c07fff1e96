"""Launch a group of worker processes with the environment torchrun would give them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world_size: int, env: dict[str, str], *, torchrun_env: bool = True,
           stdin: int | None = None) -> list[subprocess.Popen]:
    """Start `world_size` workers running loop_worker.py; torchrun_env=False starts one plain
    process with no launcher variables at all."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        child = dict(env)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            child.pop(name, None)
        if torchrun_env:
            child.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, *args], env=child, stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str, str]]:
    """Wait for every process; kill the rest if one times out. Returns (rc, out, err) each."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def run_ok(args: list[str], world_size: int, env: dict[str, str], **kw) -> list[str]:
    results = finish(launch(args, world_size, env, **kw))
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}\n{out}\n{err[-3000:]}"
    return [out for _, out, _ in results]
