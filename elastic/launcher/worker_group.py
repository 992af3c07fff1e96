"""Start, watch and stop the worker processes of one node for one rendezvous round.

Each worker runs in a session of its own (so a signal to its process group reaches anything
it started) with a parent-death signal (so a SIGKILLed agent leaves no orphans). Output is
read line by line and shown with a rank prefix, and copied to per-rank files under
`--log-dir` when given. Python workers are normally warm spares (elastic/launcher/warm_pool.py) that
get their rank here; the streams are taken over the same way.
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

from elastic.exchange import control, env as names
from elastic.host.net import interface_of
from elastic.host.process import kernel_state, kill_sessions, spawn_worker
from elastic.exchange.error_record import ErrorRecord
from elastic.launcher.commit_wait import wait_all, wait_for_commit
from elastic.launcher.config import STDERR, STDOUT, LaunchConfig
from elastic.launcher.hang_watch import ProgressWatch
from elastic.launcher import memory_dir
from elastic.launcher.warm_pool import WarmPool
from elastic.launcher.bootstrap import boot_command
from elastic.launcher.numa_binding import bind_process
from elastic.launcher.torchrun_flags import virtual_local_rank_env
from elastic.rendezvous.protocol import Assignment

@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended."""

    local_rank: int
    rank: int
    returncode: int | None  # negative: killed by that signal (subprocess convention); None: not dead

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return "still running (survived SIGKILL)"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit code {self.returncode}"


def worker_command(config: LaunchConfig) -> list[str]:
    """The argv of a worker: the script runs as with torchrun, through elastic.launcher.bootstrap."""
    if config.no_python:
        return [config.entrypoint, *config.args]
    return boot_command(*worker_main_args(config))


def worker_main_args(config: LaunchConfig) -> list[str]:
    """What elastic.launcher.bootstrap runs: the script (or -m module) and its arguments."""
    if config.module:
        return ["-m", config.entrypoint, *config.args]
    return [config.entrypoint, *config.args]


def common_env(config: LaunchConfig, rdzv_endpoint: str, node_id: str, run_dir: str) -> dict[str, str]:
    """The part of every worker's environment that is the same for all ranks and rounds
    (a warm spare starts with it: see elastic/launcher/warm_pool.py): ours, less the
    launcher's own settings (the etcd password, gRPC's fork setting)."""
    env = {k: v for k, v in os.environ.items() if k not in names.LAUNCHER_ONLY}
    env.update(
        LOCAL_WORLD_SIZE=str(config.nproc_per_node),
        ROLE_NAME=config.role,
        TORCHELASTIC_MAX_RESTARTS=str(config.max_restarts),
        TORCHELASTIC_RUN_ID=config.run_id,
        TORCHELASTIC_USE_AGENT_STORE="False",
        PYTHONUNBUFFERED="1",
    )
    env[names.NODE_ID] = node_id
    env[names.RDZV_ENDPOINT] = rdzv_endpoint
    env[names.RDZV_PREFIX] = config.rdzv.key_prefix
    env.update(names.rdzv_security_env(config.rdzv, password_path(run_dir)))
    env.setdefault("OMP_NUM_THREADS", "1")
    if config.checkpoint_dir:
        env[names.CHECKPOINT_DIR] = config.checkpoint_dir
    memory = memory_dir.path(config.run_id, node_id)  # created by the agent (elastic/launcher/memory_dir.py)
    if memory is not None:
        env[names.MEMORY_DIR] = memory
    return env


def worker_env(config: LaunchConfig, assignment: Assignment, local_rank: int, run_dir: str,
               rdzv_endpoint: str, node_id: str) -> dict[str, str]:
    """torchrun's worker environment plus ours (see docs/ARCHITECTURE.md, "Worker environment")."""
    rank = assignment.rank_offset + local_rank
    env = common_env(config, rdzv_endpoint, node_id, run_dir)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(assignment.world_size),
        GROUP_RANK=str(assignment.group_rank),
        GROUP_WORLD_SIZE=str(assignment.num_nodes),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(assignment.world_size),
        MASTER_ADDR=assignment.master_addr,
        MASTER_PORT=str(assignment.master_port),
        TORCHELASTIC_RESTART_COUNT=str(assignment.restart_count),
    )
    if config.virtual_local_rank:
        env.update(virtual_local_rank_env(local_rank))
    env[names.ROUND] = str(assignment.round)
    env[names.PROGRESS_FILE] = progress_path(run_dir, rank)
    env[names.ERROR_FILE] = error_path(run_dir, rank)
    if config.reconfigure:
        env[names.CONTROL_FILE] = control.control_path(run_dir, local_rank)
    # gloo otherwise binds to what the host name resolves to (or loopback), NCCL's sockets to
    # the first interface it likes: wrong on a node with several networks, where peers reach
    # it only at its registered address. The user's own setting wins.
    interface = interface_of(assignment.local_addr)
    if interface is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
        env.setdefault("NCCL_SOCKET_IFNAME", "=" + interface)  # "=": this name exactly, not a prefix
    return env


def password_path(run_dir: str) -> str:
    """The etcd password for the workers' round fence (mode 0600, written by the agent)."""
    return os.path.join(run_dir, "etcd-password")


def progress_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"progress-rank{rank}")


def error_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"error-rank{rank}.json")


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
        self.unkillable: list[int] = []  # pids that survived SIGKILL for --unkillable-timeout
        self._stuck_sessions: dict[int, int] = {}  # those pids -> the worker session they are in
        self.lost_commit: int | None = None  # the step whose commit SIGKILL cut off (stop())
        self.ended = False  # stopped, or every worker exited by itself (wait_output)
        # Wall-clock time of the last poll() that found every worker running: a worker killed
        # by a signal died after it (used to tell who failed first, see EtcdRendezvous.blame).
        self.all_alive_at = time.time()
        self.started = time.monotonic()  # the group's creation: how long its round ran
        ranks = range(assignment.rank_offset, assignment.rank_offset + config.nproc_per_node)
        self.progress = ProgressWatch({r: progress_path(run_dir, r) for r in ranks}, config.hang)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self, pool: WarmPool | None = None) -> None:
        """Start the workers: in spares of `pool` if given (Python workers only), else cold."""
        cmd = worker_command(self._config)
        for local_rank in range(self._config.nproc_per_node):
            env = self._env(local_rank)
            control.clear(control.control_path(self._run_dir, local_rank))  # a request to a worker gone
            if pool is not None:
                proc = pool.launch(worker_main_args(self._config), env)
            else:
                proc = spawn_worker(cmd, env)
            self._procs.append(proc)
            if self._config.cpu_binding:  # --numa-binding
                bind_process(proc.pid, self._config.cpu_binding[local_rank])
            self._pump(proc.stdout, sys.stdout.buffer, local_rank, STDOUT)
            self._pump(proc.stderr, sys.stderr.buffer, local_rank, STDERR)

    def adopt(self, parked: WorkerGroup) -> None:
        """Take over the parked workers of the last round (same processes, same output pumps
        and log files) and hand each its place in this round (elastic/exchange/control.py)."""
        self._procs, self._pumps = parked._procs, parked._pumps
        for local_rank in range(self._config.nproc_per_node):
            control.send_assignment(control.control_path(self._run_dir, local_rank), self._env(local_rank))

    def request_park(self) -> None:
        """Ask every worker to park after the step they agree on (see elastic/exchange/control.py)."""
        for local_rank in range(self._config.nproc_per_node):
            control.request_park(control.control_path(self._run_dir, local_rank))

    @property
    def running(self) -> bool:
        return all(p.poll() is None for p in self._procs)

    def _env(self, local_rank: int) -> dict[str, str]:
        """A worker's environment for this round; clears the error file its rank may have left."""
        stale = error_path(self._run_dir, self._assignment.rank_offset + local_rank)
        if os.path.exists(stale):
            os.unlink(stale)
        return worker_env(self._config, self._assignment, local_rank, self._run_dir,
                          self._rdzv_endpoint, self._node_id)

    def _pump(self, source: IO[bytes], console: IO[bytes], local_rank: int, bit: int) -> None:
        """Copy a worker stream line by line: to its log file (with --log-dir) and, unless
        redirected or filtered out, to our console with a rank prefix."""
        rank = self._assignment.rank_offset + local_rank
        stream = "stdout" if bit == STDOUT else "stderr"
        log = None
        if self._config.log_dir:
            directory = os.path.join(self._config.log_dir, f"round{self._assignment.round}")
            os.makedirs(directory, exist_ok=True)
            log = open(os.path.join(directory, f"rank{rank}.{stream}.log"), "ab")
        shown = (not self._config.redirects.get(local_rank, 0) & bit
                 and (self._config.local_ranks_filter is None or local_rank in self._config.local_ranks_filter))
        prefix = f"[rank{rank}]: ".encode()
        thread = threading.Thread(target=_copy_lines, args=(source, console if shown else None, log, prefix),
                                  name=f"pump-rank{rank}-{stream}", daemon=True)
        thread.start()
        self._pumps.append(thread)

    def poll(self) -> list[WorkerExit] | None:
        """None while every worker runs and none failed; else the exits seen so far.

        The group is finished when every worker exited 0, or as soon as one failed.
        """
        now = time.time()
        exits = [
            WorkerExit(i, self._assignment.rank_offset + i, p.returncode)
            for i, p in enumerate(self._procs) if p.poll() is not None
        ]
        if any(not e.ok for e in exits) or len(exits) == len(self._procs):
            return exits
        if not exits:
            self.all_alive_at = now
        return None

    def stop(self, grace: float) -> list[WorkerExit]:
        """Stop every worker and every process it started (its whole session, also when the
        worker itself is already dead): SIGTERM to each running worker's process group, up to
        `grace` seconds (longer, up to --commit-timeout, while a checkpoint commit is in
        flight), then SIGKILL. Returns when all are gone, or --unkillable-timeout passed
        (those left are in `unkillable`).

        `grace=0` kills at once (after a failure nothing the survivors do can complete: the
        last committed checkpoint is the resume point).
        """
        self.ended = True
        if grace > 0:
            self._signal_all(signal.SIGTERM)
            wait_all(self._procs, time.monotonic() + grace)
            self.lost_commit = wait_for_commit(self._procs, self.progress, self._config.commit_timeout,
                                               self._config.monitor_interval)
        stuck = kill_sessions(self._own_sessions(), self._config.unkillable_timeout)
        self.unkillable = sorted(stuck)
        self._stuck_sessions.update(stuck)
        for proc in self._procs:
            if proc.pid not in stuck:
                proc.wait()  # dead (kill_sessions saw it exit): reaps it
        self._close_output()
        return [WorkerExit(i, self._assignment.rank_offset + i, p.returncode)
                for i, p in enumerate(self._procs)]

    def _own_sessions(self) -> list[int]:
        """The sessions our workers lead. A reaped worker's pid is ours only while a process
        of its session lives (the kernel reuses no pid that still names a session): if a
        process with that pid exists now, it is someone else's."""
        return [p.pid for p in self._procs if p.returncode is None or not os.path.exists(f"/proc/{p.pid}")]

    def describe_unkillable(self) -> str:
        """The processes that survived SIGKILL, with what the kernel says they are doing."""
        ranks = {p.pid: self._assignment.rank_offset + i for i, p in enumerate(self._procs)}
        return ", ".join(
            (f"rank {ranks[pid]}" if pid in ranks else f"a process of rank {ranks[sid]}")
            + f" (pid {pid}: {kernel_state(pid)})" for pid, sid in sorted(self._stuck_sessions.items()))

    def dump_stacks(self, rank: int, wait: float = 0.5) -> None:
        """Ask a (hung) rank to print every thread's Python stack to its stderr (SIGUSR1)."""
        proc = self._procs[rank - self._assignment.rank_offset]
        if proc.poll() is None and not self._config.no_python:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(wait)  # faulthandler writes at once; give the output pump a moment

    def first_failure(self, seen: list[WorkerExit], final: list[WorkerExit]
                      ) -> tuple[WorkerExit, ErrorRecord | None]:
        """The rank whose failure came first, and the error it recorded if it raised.

        `seen` are the exits that made us stop the group, `final` every exit after stop().
        Other ranks often die of the first one's death (a peer gone under a collective), and
        a rank that raised may still be in its exit handlers when a peer's exit is seen, so
        the earliest recorded exception wins; without one, the first exit we saw.
        """
        errors = {e.rank: ErrorRecord.read(error_path(self._run_dir, e.rank)) for e in final}
        early = [e.rank for e in seen if not e.ok]
        candidates = [e for e in final if e.rank in early or errors[e.rank]]
        first = min(candidates, key=lambda e: (errors[e.rank].time if errors[e.rank] else float("inf"),
                                               early.index(e.rank) if e.rank in early else len(early)))
        return first, errors[first.rank]

    def wait_output(self) -> None:
        """After every worker exited: let the output threads drain, then close the logs.

        What the workers started is left running, as torchrun leaves it (a script may start
        a server meant to outlive it); only a stopped group has its sessions killed."""
        self.ended = True
        self._close_output()

    def _close_output(self) -> None:
        # A grandchild that inherited the pipe, or a worker that survived SIGKILL, can keep it
        # open: wait for all of them together, not for each in turn.
        deadline = time.monotonic() + 2.0
        for thread in self._pumps:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass  # exited between poll() and killpg()


def _copy_lines(source: IO[bytes], console: IO[bytes] | None, log: IO[bytes] | None, prefix: bytes) -> None:
    for line in iter(source.readline, b""):
        if console is not None:
            console.write(prefix + line)
            console.flush()
        if log is not None:
            log.write(line)
            log.flush()
    source.close()
    if log is not None:
        log.close()
