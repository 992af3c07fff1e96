"""Start, watch and stop the worker processes of one node for one rendezvous round.

Each worker runs in a session of its own (so a signal to its process group reaches anything
it started) with a parent-death signal (so a SIGKILLed agent leaves no orphans). Output is
read line by line and shown with a rank prefix, and copied to per-rank files under
`--log-dir` when given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from elastic._process import die_with_parent
from elastic.fencing import fence_env
from elastic.launch_config import LaunchConfig

@dataclass(frozen=True)
class Assignment:
    """This node's place in a sealed round: what its workers need to form the process group."""

    round: int
    group_rank: int  # this node's index among the round's members
    num_nodes: int
    world_size: int
    rank_offset: int  # global rank of this node's local rank 0
    master_addr: str
    master_port: int
    restart_count: int


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended."""

    local_rank: int
    rank: int
    returncode: int  # negative: killed by that signal (subprocess convention)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit code {self.returncode}"


def worker_command(config: LaunchConfig) -> list[str]:
    """The argv of a worker: the script runs as with torchrun, through elastic.worker_main."""
    if config.no_python:
        return [config.entrypoint, *config.args]
    boot = [sys.executable, "-u", "-m", "elastic.worker_main"]
    if config.module:
        return [*boot, "-m", config.entrypoint, *config.args]
    return [*boot, config.entrypoint, *config.args]


def worker_env(config: LaunchConfig, assignment: Assignment, local_rank: int, run_dir: str,
               rdzv_endpoint: str, node_id: str) -> dict[str, str]:
    """torchrun's worker environment plus ours (see docs/ARCHITECTURE.md, "Worker environment")."""
    rank = assignment.rank_offset + local_rank
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(assignment.world_size),
        LOCAL_WORLD_SIZE=str(config.nproc_per_node),
        GROUP_RANK=str(assignment.group_rank),
        GROUP_WORLD_SIZE=str(assignment.num_nodes),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(assignment.world_size),
        ROLE_NAME="default",
        MASTER_ADDR=assignment.master_addr,
        MASTER_PORT=str(assignment.master_port),
        TORCHELASTIC_RESTART_COUNT=str(assignment.restart_count),
        TORCHELASTIC_MAX_RESTARTS=str(config.max_restarts),
        TORCHELASTIC_RUN_ID=config.run_id,
        TORCHELASTIC_USE_AGENT_STORE="False",
        ELASTIC_ROUND=str(assignment.round),
        ELASTIC_NODE_ID=node_id,
        ELASTIC_RDZV_ENDPOINT=rdzv_endpoint,
        ELASTIC_RDZV_PREFIX=config.rdzv.key_prefix,
        ELASTIC_PROGRESS_FILE=os.path.join(run_dir, f"progress-rank{rank}"),
        PYTHONUNBUFFERED="1",
    )
    env.update(fence_env(config.rdzv))
    env.setdefault("OMP_NUM_THREADS", "1")
    if config.checkpoint_dir:
        env["ELASTIC_CHECKPOINT_DIR"] = config.checkpoint_dir
    return env


class WorkerGroup:
    """The `nproc_per_node` workers of this node for one round."""

    def __init__(self, config: LaunchConfig, assignment: Assignment, run_dir: str,
                 rdzv_endpoint: str, node_id: str) -> None:
        self._config = config
        self._node_id = node_id
        self._assignment = assignment
        self._run_dir = run_dir
        self._rdzv_endpoint = rdzv_endpoint
        self._procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []

    @property
    def assignment(self) -> Assignment:
        return self._assignment

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        cmd = worker_command(self._config)
        for local_rank in range(self._config.nproc_per_node):
            env = worker_env(self._config, self._assignment, local_rank, self._run_dir,
                             self._rdzv_endpoint, self._node_id)
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent,
            )
            self._procs.append(proc)
            rank = self._assignment.rank_offset + local_rank
            self._pump(proc.stdout, sys.stdout.buffer, rank, "stdout")
            self._pump(proc.stderr, sys.stderr.buffer, rank, "stderr")

    def _pump(self, source: IO[bytes], console: IO[bytes], rank: int, stream: str) -> None:
        log = None
        if self._config.log_dir:
            directory = os.path.join(self._config.log_dir, f"round{self._assignment.round}")
            os.makedirs(directory, exist_ok=True)
            log = open(os.path.join(directory, f"rank{rank}.{stream}.log"), "ab")
        prefix = f"[rank{rank}]: ".encode()
        thread = threading.Thread(target=_copy_lines, args=(source, console, log, prefix),
                                  name=f"pump-rank{rank}-{stream}", daemon=True)
        thread.start()
        self._pumps.append(thread)

    def poll(self) -> list[WorkerExit] | None:
        """None while every worker runs and none failed; else the exits seen so far.

        The group is finished when every worker exited 0, or as soon as one failed.
        """
        exits = [
            WorkerExit(i, self._assignment.rank_offset + i, p.returncode)
            for i, p in enumerate(self._procs) if p.poll() is not None
        ]
        if any(not e.ok for e in exits) or len(exits) == len(self._procs):
            return exits
        return None

    def stop(self, grace: float) -> list[WorkerExit]:
        """Stop every worker: SIGTERM to each process group, `grace` seconds, then SIGKILL.

        `grace=0` kills at once (after a failure nothing the survivors do can complete: the
        last committed checkpoint is the resume point). Returns when all are reaped.
        """
        if grace > 0:
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        self._signal_all(signal.SIGKILL)
        for proc in self._procs:
            proc.wait()
        self._close_output()
        return [WorkerExit(i, self._assignment.rank_offset + i, p.returncode)
                for i, p in enumerate(self._procs)]

    def wait_output(self) -> None:
        """After every worker exited: let the output threads drain, then close the logs."""
        self._close_output()

    def _close_output(self) -> None:
        # A grandchild that inherited the pipe can keep it open; do not wait for it forever.
        for thread in self._pumps:
            thread.join(timeout=2.0)

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass  # exited between poll() and killpg()


def _copy_lines(source: IO[bytes], console: IO[bytes], log: IO[bytes] | None, prefix: bytes) -> None:
    for line in iter(source.readline, b""):
        console.write(prefix + line)
        console.flush()
        if log is not None:
            log.write(line)
            log.flush()
    source.close()
    if log is not None:
        log.close()
