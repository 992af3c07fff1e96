"""Launch groups of loop_worker.py (or another worker script's) processes with the environment
torchrun would give them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from elastic.host.net import free_port

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_worker.py")


class Group:
    """`world_size` workers; torchrun_env=False starts one plain process with no launcher
    variables at all (the single-process path of elastic.init); new_session=True puts each
    in a process group of its own (as elastic-run does), for signals to the whole group."""

    def __init__(self, args: list[str], world_size: int, env: dict[str, str], *,
                 torchrun_env: bool = True, stdin: bool = False,
                 progress_dir: str | None = None, worker: str = WORKER,
                 new_session: bool = False) -> None:
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.stderr = [tempfile.TemporaryFile(mode="w+") for _ in range(world_size)]
        for rank in range(world_size):
            child = {k: v for k, v in env.items() if k not in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            child["OMP_NUM_THREADS"] = "1"
            if progress_dir is not None:
                child["ELASTIC_PROGRESS_FILE"] = os.path.join(progress_dir, f"progress.rank{rank}")
            if torchrun_env:
                child.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                             LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port))
            self.procs.append(subprocess.Popen(
                [sys.executable, worker, *args], env=child, text=True,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=self.stderr[rank], start_new_session=new_session,
            ))

    def wait(self, timeout: float = 200) -> list[tuple[int, str, str]]:
        """(returncode, stdout, stderr) per rank; kills every process on a timeout."""
        try:
            outs = [p.communicate(timeout=timeout)[0] for p in self.procs]
        finally:
            self.kill()
        results = []
        for p, out, err in zip(self.procs, outs, self.stderr):
            err.seek(0)
            results.append((p.returncode, out, err.read()))
            err.close()
        return results

    def wait_ok(self, timeout: float = 200) -> list[str]:
        results = self.wait(timeout)
        for rank, (rc, out, err) in enumerate(results):
            assert rc == 0, f"rank {rank} exited {rc}\n{out}\n{err[-4000:]}"
        return [out for _, out, _ in results]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
