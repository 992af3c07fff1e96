"""Helpers for tests that run `elastic-run` and its workers as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")

if REPO not in sys.path:
    sys.path.append(REPO)  # benchmarks/ is found in the checkout, not installed
from benchmarks._common import read_jsonl, wait_until  # noqa: E402, F401  (re-exported for the tests)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def elastic_run(*args: str, **popen_kwargs) -> subprocess.Popen:
    """Start `python -m elastic ARGS` with captured output."""
    return subprocess.Popen(
        [sys.executable, "-m", "elastic", *args], env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **popen_kwargs,
    )


def wait_for_files(paths: list[str], timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until every path exists (the workers announce themselves by writing files)."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"elastic-run exited {proc.returncode} early:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.05)


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """Wait for the pids to disappear; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return set()
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


class Job:
    """Agents of one run on one etcd, each a real `elastic-run` process with its own node id."""

    def __init__(self, endpoint: str, run_id: str, outdir: Path, nnodes: str, conf: str = "",
                 max_restarts: int = 3, *, script: str | None = None,
                 script_args: list[str] | None = None, flags: tuple[str, ...] = ()) -> None:
        """`script` (default: tests/scripts/rdzv_worker.py OUTDIR) runs with `script_args`;
        `flags` are extra elastic-run flags (e.g. --checkpoint-dir, --hang-timeout)."""
        self.endpoint, self.run_id, self.outdir = endpoint, run_id, Path(outdir)
        self.nnodes, self.max_restarts = nnodes, max_restarts
        self.script = script or os.path.join(SCRIPTS, "rdzv_worker.py")
        self.script_args = [str(outdir)] if script_args is None else list(script_args)
        self.flags = tuple(flags)
        self.conf = "lease_ttl=3,last_call_timeout=30,join_timeout=60" + ("," + conf if conf else "")
        self.agents: dict[str, subprocess.Popen] = {}

    def start(self, node: str, *extra: str) -> subprocess.Popen:
        """Start node's agent; `extra`: flags for this node only (e.g. --local-addr)."""
        log = open(self.outdir / f"agent-{node}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "elastic", "--nnodes", self.nnodes, "--nproc-per-node", "1",
             "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id, "--node-id", node,
             "--rdzv-conf", self.conf, "--max-restarts", str(self.max_restarts), "--grace", "3",
             "--log-dir", str(self.outdir / f"logs-{node}"), *self.flags, *extra, self.script, *self.script_args],
            env=child_env(ELASTIC_LOG_LEVEL="INFO"), stdout=log, stderr=subprocess.STDOUT,
        )
        self.agents[node] = proc
        return proc

    def round_view(self, round_: int) -> dict[str, dict]:
        """node -> its worker's view, for every worker that started in `round_`."""
        views = {}
        for path in self.outdir.glob(f"round{round_}-rank*.json"):
            view = json.loads(path.read_text())
            views[view["ELASTIC_NODE_ID"]] = view
        return views

    def wait_round(self, round_: int, nodes: set[str], timeout: float = 60.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = self.round_view(round_)
            if set(views) == nodes:
                return views
            assert set(views) <= nodes, f"round {round_} has unexpected nodes {set(views) - nodes}"
            for node, proc in self.agents.items():
                if proc.poll() is not None and node in nodes:
                    raise AssertionError(f"agent {node} exited {proc.returncode}:\n{self.log(node)}")
            time.sleep(0.05)
        raise AssertionError(f"round {round_} never had nodes {nodes}; has {set(self.round_view(round_))}\n"
                             + "\n".join(f"--- {n}\n{self.log(n)}" for n in self.agents))

    def worker_pid(self, node: str, round_: int) -> int:
        (path,) = self.outdir.glob(f"pid-{node}-round{round_}-rank*")
        return int(path.read_text())

    def finish(self, timeout: float = 60.0) -> dict[str, int]:
        (self.outdir / "finish").touch()
        return {n: p.wait(timeout) for n, p in self.agents.items()}

    def log(self, node: str) -> str:
        return (self.outdir / f"agent-{node}.log").read_text()

    def events(self, node: str) -> list[dict]:
        return read_jsonl(self.outdir / f"logs-{node}" / "events.jsonl")

    def kill_all(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fork_ranks(world: int, fn, store: str, timeout: float = 120.0) -> list[int | None]:
    """Fork the ranks of one torchrun-like group and run `fn()` in each; their exit codes.

    world 0 means one process with no process group. Each rank sees RANK, LOCAL_RANK,
    WORLD_SIZE and CKPT_TEST_STORE (a FileStore path for init_method="file://..."). A rank
    whose `fn` raises prints the traceback and exits 1. Forking (torch already imported by
    the caller) spares every rank the seconds an interpreter takes to import torch.
    """
    import multiprocessing
    import traceback

    def rank_main(rank: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), CKPT_TEST_STORE=store)
        try:
            fn()
        except BaseException:  # report and fail this rank; the caller checks exit codes
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r,)) for r in range(max(world, 1))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
