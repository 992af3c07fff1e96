"""What `elastic-run` was asked to do, validated once at the boundary.

`LaunchConfig` is the frozen record the CLI builds from flags (and PET_* variables); the
agent, the rendezvous and the worker group only ever see this record, never raw flags.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from elastic.errors import ConfigError
from elastic.launcher.hang_watch import HangLimits
from elastic.launcher.torchrun_flags import DEFAULT_SIGNALS, StaticMaster, parse_signals, virtual_local_rank_env
from elastic.rendezvous.settings import RendezvousSettings


@dataclass(frozen=True)
class LaunchConfig:
    """Everything one agent needs to run its share of a job."""

    entrypoint: str
    args: tuple[str, ...]
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    rdzv_endpoint: str | None = None  # None: start a private etcd (standalone)
    run_id: str = "default"
    max_restarts: int = 0
    monitor_interval: float = 0.1
    grace: float = 5.0  # SIGTERM -> SIGKILL window when stopping workers
    # After --grace, workers whose progress records show a checkpoint commit in flight get up
    # to this much longer: a multi-GB commit to object storage outlasts any short grace, and
    # SIGKILL would lose the step they were asked to save.
    commit_timeout: float = 300.0
    # How long a SIGKILLed worker may take to disappear before the node gives up on it (a
    # process in uninterruptible sleep, D state, ignores even SIGKILL). A killed worker is
    # normally gone in well under a second, but freeing tens of GB of pinned memory or a GPU
    # context can take seconds: too short a bound throws a healthy node out of the job, while
    # a longer one only delays a node that is lost anyway. Slurm's UnkillableStepTimeout is 60 s.
    unkillable_timeout: float = 30.0
    module: bool = False
    no_python: bool = False
    checkpoint_dir: str | None = None
    log_dir: str | None = None
    redirects: dict[int, int] = field(default_factory=dict)  # local rank -> STD bits kept off the console
    local_ranks_filter: frozenset[int] | None = None  # local ranks shown on the console (None: all)
    hang: HangLimits = field(default_factory=HangLimits)  # when a rank reporting progress is hung
    node_id: str | None = None
    local_addr: str | None = None
    warm_pool: bool = True  # restart Python workers in spares that already imported torch
    # Planned changes re-form TrainLoop workers' group in-process. Opt-in: a new rank runs the
    # script from the top, so a collective before the loop (a barrier after a rank-0
    # download) would have no partner among the kept ranks and hang the job.
    reconfigure: bool = False
    rdzv: RendezvousSettings = field(default_factory=RendezvousSettings)
    # Identical failures in a row (same error, no progress between) that stop the job as
    # deterministic; 0: never (only --max-restarts stops it). Faults never count.
    same_failure_limit: int = 3
    # torchrun's static rendezvous (--master-addr/--master-port/--node-rank): a fixed world, no etcd.
    static: StaticMaster | None = None
    # --rdzv-backend c10d|static|etcd-v2 with an endpoint: the endpoint's host serves the etcd.
    embedded_etcd: bool = False
    role: str = "default"  # ROLE_NAME of the workers
    signals: tuple[int, ...] = parse_signals(DEFAULT_SIGNALS)  # stop the job as SIGTERM does
    virtual_local_rank: bool = False  # LOCAL_RANK=0, CUDA_VISIBLE_DEVICES=the worker's own GPU
    # --numa-binding: the CPUs each local rank's worker is bound to (those near its GPU).
    cpu_binding: tuple[frozenset[int], ...] | None = None
    metrics_port: int | None = None  # serve Prometheus metrics on this port (elastic/launcher/metrics.py)
    # A node busy more than this x the others' median per step is a straggler (0: never judged).
    straggler_factor: float = 2.0
    exclude_stragglers: bool = False  # a node that stays a straggler for the window counts as failed
    straggler_window: float = 60.0

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} must be a port number (0-65535)")
        if self.straggler_factor < 0 or 0 < self.straggler_factor <= 1 or self.straggler_window <= 0:
            raise ConfigError(f"--straggler-factor {self.straggler_factor:g} must be 0 (off) or > 1, and "
                              f"--straggler-window {self.straggler_window:g} > 0 seconds")
        if self.run_id == "status":
            raise ConfigError("--rdzv-id 'status' is reserved (the status keys live under /<prefix>/status/): "
                              "pick another run id")
        if self.same_failure_limit < 0 or self.same_failure_limit == 1:
            raise ConfigError(f"--same-failure-limit {self.same_failure_limit} must be 0 (off) or >= 2")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node {self.nproc_per_node} must be >= 1")
        if self.min_nodes < 1:
            raise ConfigError(f"--nnodes: the minimum number of nodes ({self.min_nodes}) must be >= 1")
        if self.max_nodes < self.min_nodes:
            raise ConfigError(f"--nnodes {self.min_nodes}:{self.max_nodes}: MAX must be >= MIN")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts {self.max_restarts} must be >= 0")
        if self.monitor_interval <= 0:
            raise ConfigError(f"--monitor-interval {self.monitor_interval} must be > 0 seconds")
        if self.grace < 0:
            raise ConfigError(f"--grace {self.grace} must be >= 0 seconds")
        if self.commit_timeout < 0:
            raise ConfigError(f"--commit-timeout {self.commit_timeout} must be >= 0 seconds")
        if self.unkillable_timeout <= 0:
            raise ConfigError(f"--unkillable-timeout {self.unkillable_timeout} must be > 0 seconds")
        if self.hang.timeout < 0 or self.hang.first_step_timeout <= 0:
            raise ConfigError(f"--hang-timeout {self.hang.timeout:g} must be >= 0 (0 disables) and "
                              f"--first-step-timeout {self.hang.first_step_timeout:g} > 0 seconds")
        if not self.run_id or "/" in self.run_id:
            raise ConfigError(f"--rdzv-id {self.run_id!r} must be non-empty and contain no '/'")
        if self.rdzv_endpoint is None and self.static is None and self.max_nodes > 1:
            raise ConfigError(
                f"--nnodes {self.min_nodes}:{self.max_nodes} spans several nodes: give "
                "--rdzv-endpoint HOST:PORT of an etcd all nodes reach (or, for --nnodes N, "
                "--master-addr/--master-port/--node-rank: a static rendezvous)"
            )
        if self.virtual_local_rank:
            virtual_local_rank_env(self.nproc_per_node - 1)  # every local rank has a GPU to see
        self._check_entrypoint()

    def _check_entrypoint(self) -> None:
        if self.no_python and self.module:
            raise ConfigError("--no-python and -m cannot be used together")
        if self.no_python:
            if shutil.which(self.entrypoint) is None:
                raise ConfigError(f"program {self.entrypoint!r} not found (--no-python runs it directly)")
        elif not self.module and not os.path.isfile(self.entrypoint):
            raise ConfigError(f"training script {self.entrypoint!r} not found")

    @property
    def standalone(self) -> bool:
        """A private etcd on loopback (not the static rendezvous, which has no etcd)."""
        return self.rdzv_endpoint is None and self.static is None


def parse_nnodes(text: str) -> tuple[int, int]:
    """'N' or 'MIN:MAX' -> (min, max)."""
    lo, sep, hi = text.partition(":")
    try:
        min_nodes = int(lo)
        max_nodes = int(hi) if sep else min_nodes
    except ValueError:
        raise ConfigError(f"--nnodes {text!r} must be N or MIN:MAX (for example 2:4)") from None
    return min_nodes, max_nodes


def parse_hang(text: str, first_step_timeout: float) -> HangLimits:
    """'SECONDS' (fixed) or 'auto[:FACTOR[:MIN]]' (calibrated from step times, at most the
    default fixed timeout) -> HangLimits."""
    usage = f"--hang-timeout {text!r} must be SECONDS, or auto[:FACTOR[:MIN_SECONDS]] (for example auto:10:30)"
    head, _, rest = text.partition(":")
    try:
        if head != "auto":
            if rest:
                raise ValueError(text)
            return HangLimits(timeout=float(text), first_step_timeout=first_step_timeout)
        factor, _, floor = rest.partition(":")
        limits = HangLimits(first_step_timeout=first_step_timeout, factor=float(factor or 10),
                            floor=float(floor or HangLimits.floor))
    except ValueError:
        raise ConfigError(usage) from None
    if limits.factor <= 1 or limits.floor <= 0:
        raise ConfigError(f"{usage}; FACTOR must be > 1 and MIN_SECONDS > 0")
    return limits


STDOUT, STDERR = 1, 2  # torchrun's Std bits: 0 none, 1 stdout, 2 stderr, 3 both


def parse_std(flag: str, text: str, nproc: int) -> dict[int, int]:
    """torchrun's '3' (every local rank) or '0:1,1:2' (per local rank) -> {local_rank: bits}."""
    try:
        if ":" not in text:
            bits = int(text)
            mapping = {rank: bits for rank in range(nproc)}
        else:
            mapping = {int(k): int(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be 0-3 or LOCAL_RANK:0-3,... (1 stdout, 2 stderr, 3 both)") from None
    if any(not 0 <= b <= 3 for b in mapping.values()):
        raise ConfigError(f"{flag} {text!r}: each value must be 0, 1, 2 or 3")
    return {rank: bits for rank, bits in mapping.items() if bits}


def parse_nproc(text: str) -> int:
    """An int, or 'auto'/'cpu'/'gpu'/'xpu' as torchrun accepts them."""
    if text in ("auto", "gpu", "xpu"):
        import torch  # noqa: PLC0415  (only when asked, torch is slow to import)

        if text == "auto":  # torchrun: the current accelerator's devices, else one worker per CPU
            accelerator = getattr(torch, "accelerator", torch.cuda)  # torch.accelerator: torch >= 2.6
            return accelerator.device_count() if accelerator.is_available() else os.cpu_count() or 1
        device = torch.cuda if text == "gpu" else torch.xpu
        if not device.is_available():
            raise ConfigError(f"--nproc-per-node {text}: no {text.upper()} device is visible on this node")
        return device.device_count()
    if text == "cpu":
        return os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--nproc-per-node {text!r} must be a number, 'auto', 'cpu', 'gpu' or 'xpu'") from None
