"""`elastic.init()`: join the process group from the launcher's environment.

Works under `elastic-run`, plain `torchrun`, or as a single process with no launcher
environment (world size 1, no process group). The environment (torchrun's variables plus
ELASTIC_ROUND, ELASTIC_CHECKPOINT_DIR, ELASTIC_PROGRESS_FILE) is read once, validated, and
turned into a frozen `Context`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from elastic.errors import ConfigError
from elastic.exchange import env as names
from elastic.exchange.env import int_var
from elastic.exchange.progress import Commit, Progress

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Who this worker is: the same object on every call of `init()` in one process. A
    TrainLoop reconfigured in-process (see `rejoin()`) updates its fields to the new round,
    so a Context kept by the script stays right."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    round: int
    run_id: str
    # --checkpoint-dir, else ./checkpoints/<run id> under the working directory at init(),
    # made absolute so that a later chdir does not move it.
    checkpoint_dir: str


def context_from_env(env: Mapping[str, str]) -> Context:
    """Parse the launcher's environment; raise ConfigError when it is partial or wrong."""
    present = [name for name in _TORCHRUN_VARS if env.get(name)]
    if present and len(present) != len(_TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in present]
        raise ConfigError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}: "
            "launch with elastic-run or torchrun, or set none of them for a single process"
        )
    world_size = int_var(env, "WORLD_SIZE", 1, minimum=1)
    rank = int_var(env, "RANK", 0)
    if rank >= world_size:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    return Context(
        rank=rank,
        world_size=world_size,
        local_rank=int_var(env, "LOCAL_RANK", 0),
        restart_count=int_var(env, "TORCHELASTIC_RESTART_COUNT", 0),
        round=int_var(env, names.ROUND, 0),
        run_id=(run_id := env.get("TORCHELASTIC_RUN_ID") or "local"),
        checkpoint_dir=env.get(names.CHECKPOINT_DIR) or os.path.abspath(os.path.join("checkpoints", run_id)),
    )


_context: Context | None = None
_init_options: dict = {}  # init()'s backend and timeout, for rejoin()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init(*, backend: str | None = None, timeout: timedelta | None = None) -> Context:
    """Join the process group described by the environment and return this worker's Context.

    Idempotent: later calls return the first call's Context (`rejoin()` updates it). `backend`
    defaults to nccl when CUDA is available, else gloo. With no launcher environment no
    process group is created (world size 1); under a launcher one is created even at world
    size 1, so user code may call collectives either way.
    """
    global _context
    if _context is not None:
        return _context
    ctx = context_from_env(os.environ)
    launched = bool(os.environ.get("MASTER_ADDR"))
    if launched and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(
            backend=backend, init_method="env://", rank=ctx.rank, world_size=ctx.world_size,
            **kwargs,
        )
        _init_options.update(backend=backend, timeout=timeout)
        # Tearing the group down before interpreter exit: left to static destructors, gloo's
        # threads can abort the process ("terminate called without an active exception").
        # (Registered again after a rejoin(); the second call finds no group.)
        atexit.register(_destroy_process_group)
    if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (
        ctx.rank, ctx.world_size,
    ):
        raise ConfigError(
            f"the process group says rank {dist.get_rank()} of {dist.get_world_size()}, the "
            f"environment says RANK={ctx.rank} WORLD_SIZE={ctx.world_size}: initialise the "
            "group from the same environment, or let elastic.init() do it"
        )
    open_progress_file()
    log.info(
        "elastic.init: rank %d/%d local_rank %d round %d restart %d run %s",
        ctx.rank, ctx.world_size, ctx.local_rank, ctx.round, ctx.restart_count, ctx.run_id,
    )
    _context = ctx
    return ctx


def rejoin(env: Mapping[str, str]) -> Context:
    """Leave the process group and join the one `env` describes (the agent's next round for a
    worker reconfigured in-process, see elastic/exchange/control.py): the environment takes `env`'s
    values, the progress file moves to the new rank's, and the Context takes the new values."""
    global _context, _progress
    os.environ.update(env)
    _destroy_process_group()
    if _progress is not None:
        _progress.close()
    kept, _context, _progress = _context, None, None
    ctx = init(**_init_options)
    if kept is not None:  # the script may hold it: it takes the new values
        for field in dataclasses.fields(Context):
            object.__setattr__(kept, field.name, getattr(ctx, field.name))
        _context = kept
    return _context


class ProgressFile:
    """The heartbeat the agent watches: one JSON record (elastic.exchange.progress.Progress) with the
    last completed optimizer step and the newest checkpoint commits.

    Overwritten in place with pwrite on a descriptor kept open (no fsync: the agent reads the
    page cache), padded with spaces so that it never gets shorter: a reader never finds a
    stale tail. Steps come from the training thread, commits from the checkpoint writer.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._lock = threading.Lock()
        self._length = 0
        self._record = Progress(step=None, changed_at=time.time())
        self._write()

    def write(self, step: int, skipped: int = 0) -> None:
        with self._lock:
            resumed = step if self._record.resumed is None else self._record.resumed
            self._record = dataclasses.replace(self._record, step=step, changed_at=time.time(), resumed=resumed,
                                               skipped_steps=skipped)
            self._write()

    def commit(self, step: int, stall: float, tier: str = "durable") -> None:
        with self._lock:
            commits = (*self._record.commits, Commit(step, time.time(), stall, tier))[-Progress.KEPT_COMMITS:]
            self._record = dataclasses.replace(self._record, commits=commits)
            self._write()

    def declare_reconfigurable(self) -> None:
        self._update(reconfigurable=True)

    def park(self, step: int) -> None:
        self._update(parked=step)

    def restored(self, tier: str, peer_bytes: int) -> None:
        self._update(restored_tier=tier, restored_peer_bytes=peer_bytes)

    def close(self) -> None:
        os.close(self._fd)

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._record = dataclasses.replace(self._record, **changes)
            self._write()

    def _write(self) -> None:
        data = self._record.encode().ljust(self._length) + b"\n"
        os.pwrite(self._fd, data, 0)
        self._length = len(data) - 1


_progress: ProgressFile | None = None


def open_progress_file() -> None:
    """Report progress to the agent from now on, if it asked for it (elastic.init() and
    TrainLoop call this, so a loop reports its steps whether or not the script called init)."""
    global _progress
    path = os.environ.get(names.PROGRESS_FILE)
    if path and _progress is None:
        _progress = ProgressFile(path)


def report_progress(step: int, skipped: int = 0) -> None:
    """Record `step` as the last completed optimizer step, after `skipped` steps the grad scaler
    skipped (inf/NaN gradients) in the run so far (no-op without a progress file)."""
    if _progress is not None:
        _progress.write(step, skipped)


def report_restored(tier: str, peer_bytes: int = 0) -> None:
    """Tell the agent which checkpoint tier (durable or memory) this worker resumed from, and
    how many of the bytes it read came from other nodes' memory."""
    if _progress is not None:
        _progress.restored(tier, peer_bytes)


def report_reconfigurable() -> None:
    """Tell the agent that this worker can re-form its process group in-process."""
    if _progress is not None:
        _progress.declare_reconfigurable()


def report_parked(step: int) -> None:
    """Tell the agent that this worker committed `step` and waits for its next round."""
    if _progress is not None:
        _progress.park(step)


def report_commit(step: int, stall: float, tier: str = "durable") -> None:
    """Record that checkpoint `step` was committed, its save having held training `stall`
    seconds (a CheckpointManager commit listener; no-op without a progress file)."""
    if _progress is not None:
        _progress.commit(step, stall, tier)
