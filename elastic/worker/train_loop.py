"""`TrainLoop`: the training loop users write against, so restarts and resizes are invisible.

Call order (every rank runs the same sequence):
  1. `TrainLoop(...)` checks the options and computes the accumulation plan (no I/O).
  2. The first `iter(loop)` (or `loop.resume()`) loads the latest committed checkpoint, if
     any, through the CheckpointManager (a collective: all ranks load together).
  3. Each iteration yields a `Step`; iterating the Step yields this rank's A micro-batches;
     the user calls `step.backward(loss)` once per micro-batch.
  4. When the loop advances: optimizer.step(), zero_grad(), scheduler.step(), the progress
     file, the preemption check, and the periodic checkpoint.
  5. After `max_steps` the final state is saved; on SIGTERM every rank stops after the same
     step, saves it, waits for the commit and exits with code 143.
  6. Under `elastic-run --reconfigure`, a DDP loop with a checkpoint manager is reconfigured
     in-process on a planned membership change (growth, a peer leaving; elastic/control.py): at the same
     agreement as for SIGTERM it saves the step, parks until its agent hands it the next
     round, re-forms the process group (elastic.worker.context.rejoin), and resumes from that
     step's checkpoint at the new world size exactly as a freshly started worker would.
     `loop.rank`, `loop.world_size` and the Context of `elastic.init()` then hold the new values.

Checkpoint step numbers count completed optimizer steps. The periodic save of step S runs at
the boundary, right after optimizer step S, so it holds exactly the state step S+1 starts
from (parameters, optimizer, scheduler, buffers, RNG). `loop.save(metrics=...)` inside the
body of step S also saves step S: parameters only change at optimizer.step(), and the torch
RNG streams (CPU and CUDA) are taken from the snapshot made at the boundary. Python's and
NumPy's global streams, too slow to read at every step (rng_state.py), and buffers that this
step's forward passes already changed (BatchNorm statistics) are saved as they are at the
call, so save before the body draws from them (before `for batch in step`) when such a job
must resume bitwise. Saving a step that is already saved (for example to attach a
validation loss) commits it again with the new metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.utils import _sync_module_states, _verify_param_shape_across_processes
from torch.utils.data import default_collate

from elastic.exchange import control, env as names
from elastic.worker.accumulation import AccumulationPlan, MicroBatch, gradient_sync, is_ddp, is_fsdp2
from elastic.worker.context import rejoin, report_commit, report_parked, report_progress, report_reconfigurable
from elastic.errors import ConfigError, StateMismatchError, TrainLoopUsageError
from elastic.worker.fencing import commit_guard_from_env
from elastic.worker.rng_state import RngState, TorchStreams, seed_all
from elastic.worker.sampler import ElasticSampler, StepSamples

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what the supervisor expects


class Checkpointer(Protocol):
    """The part of checkpoint.CheckpointManager the loop uses."""

    def save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
        *, epoch: int | None = None, overlap: bool = False,
    ) -> None: ...
    def wait_snapshot(self) -> None: ...
    def wait(self) -> None: ...
    def load(self, state: Mapping[str, Any], step: int | None = None) -> int | None: ...
    def regroup(self) -> None: ...
    def set_commit_guard(self, guard: Callable[[], None]) -> None: ...
    def set_commit_listener(self, listener: Callable[[int, float], None]) -> None: ...


STOP_CHECK_SECONDS = 0.25  # default wall time between SIGTERM agreements (well inside --grace)
MAX_CHECK_INTERVAL = 1000  # steps
PARKED_POLL_SECONDS = 0.01  # how often a parked loop looks for its next round


def check_interval(mean_step_seconds: float, every: int | None) -> int:
    """Steps until the next SIGTERM agreement: `every` if given, else about STOP_CHECK_SECONDS
    worth of steps (at least 1; at most MAX_CHECK_INTERVAL)."""
    if every is not None:
        return every
    if mean_step_seconds <= 0.0:
        return 1
    return max(1, min(MAX_CHECK_INTERVAL, int(STOP_CHECK_SECONDS / mean_step_seconds)))


def _regroup_ddp(model: torch.nn.Module) -> None:
    """Move a DDP model to the new default group as if it had just been built there: the
    collectives its constructor makes in a new rank (default init_sync=True: a shape check, a
    broadcast of the module's state from rank 0, which the checkpoint load then overwrites)
    and a new reducer with the constructor's first-iteration buckets (the survivor's are laid
    out by its last round's gradient order; ranks with other layouts sum the wrong elements)."""
    group = dist.group.WORLD
    model.process_group = group
    parameters, expect_sparse_gradient = model._build_params_for_reducer()
    _verify_param_shape_across_processes(group, parameters)
    _sync_module_states(module=model.module, process_group=group, broadcast_bucket_size=model.broadcast_bucket_size,
                        src=0, params_and_buffers_to_ignore=model.parameters_to_ignore,
                        broadcast_buffers=model.forward_sync_buffers)
    static_graph, model.static_graph = model.static_graph, False
    model._ddp_init_helper(parameters, expect_sparse_gradient, model._build_debug_param_to_name_mapping(parameters),
                           static_graph)
    model._has_rebuilt_buckets = False
    if static_graph:
        model._set_static_graph()
    model._lazy_init_ran = False


class Step:
    """One global optimizer step as seen by one rank.

    Iterate it for this rank's micro-batches; call `backward(loss)` once per micro-batch with
    the micro-batch's mean loss. A rank whose share of the global batch is shorter than the
    accumulation steps gets a zero-weight micro-batch (a repeat of one of its own samples):
    every rank must run the same forwards and the last backward, because DDP buffer
    broadcasts and FSDP2 all-gathers are collectives. Multiplying the loss by 0.0 adds exact
    zeros to the gradient (for a finite forward), and the plan is a pure function of
    (G, m, W), so a rerun at the same world size repeats exactly the same operations: that is
    what makes resume bitwise. An explicit gradient all-reduce would also be exact, but it
    gives up DDP's bucketed overlap of communication with backward and needs a second code
    path for FSDP2's reduce-scatter.
    """

    def __init__(self, loop: TrainLoop, samples: StepSamples) -> None:
        self._loop = loop
        self._samples = samples
        self._micro_batches = loop.micro_batches
        self._current: MicroBatch | None = None
        self._backward_calls = 0
        self._finished = False

    @property
    def index(self) -> int:
        """Global optimizer step, from 0; equals the number of steps completed before it."""
        return self._samples.step

    @property
    def epoch(self) -> int:
        return self._samples.epoch

    @property
    def step_in_epoch(self) -> int:
        return self._samples.step_in_epoch

    @property
    def world_size(self) -> int:
        return self._loop.world_size

    @property
    def accumulation_steps(self) -> int:
        return self._loop.plan.accumulation_steps

    @property
    def global_sample_ids(self) -> tuple[int, ...]:
        """The G sample ids of this step, in global-batch order (same on every rank)."""
        return self._samples.ids

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """The sample ids this rank consumes in this step (zero-weight repeats excluded)."""
        start, stop = self._loop.rank_range
        return self._samples.ids[start:stop]

    @property
    def micro_batch(self) -> MicroBatch | None:
        """The micro-batch being processed (size 0 and weight 0 for a zero-weight repeat)."""
        return self._current

    def __iter__(self) -> Iterator[Any]:
        if self._current is not None or self._finished:
            raise TrainLoopUsageError(
                f"step {self.index}: its micro-batches were already iterated; iterate each "
                "Step exactly once"
            )
        loop = self._loop
        last = len(self._micro_batches) - 1
        rank_ids = self.sample_ids
        for mb in self._micro_batches:
            ids = self._samples.ids[mb.start : mb.stop] or rank_ids[:1]
            batch = loop.collate_fn([loop.dataset[i] for i in ids])
            self._current = mb
            with gradient_sync(loop.model, enabled=mb.index == last):
                yield batch
            if self._backward_calls != mb.index + 1:
                raise TrainLoopUsageError(
                    f"step {self.index}: micro-batch {mb.index} ended without step.backward("
                    "loss); call step.backward(loss) exactly once per batch (not "
                    "loss.backward(), which skips the global-batch scaling)"
                )
        self._current = None
        self._finished = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (a mean over the micro-batch), scaled for the global mean."""
        mb = self._current
        if mb is None:
            raise TrainLoopUsageError(
                f"step {self.index}: step.backward was called outside `for batch in step`"
            )
        if self._backward_calls > mb.index:
            raise TrainLoopUsageError(
                f"step {self.index}: step.backward was called twice for micro-batch "
                f"{mb.index}; call it once per batch with the micro-batch's mean loss"
            )
        (loss * mb.weight).backward()
        self._backward_calls += 1


class _LoopState:
    """Step position, sampler identity and every rank's RNG streams, all JSON values."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = dict(state)


class TrainLoop:
    """Owns the step counter, the elastic sampler, accumulation, checkpoints and resume.

    Not thread-safe; one per process, created on every rank (it makes a small gloo group).
    All options are keyword-only and checked here, at the boundary:
    - `checkpoint`: a CheckpointManager, or None to train without checkpoints;
    - `save_every`: also save after every n-th optimizer step (None: only at the end, on
      SIGTERM and when `save()` is called);
    - `extra_state`: more entries for the checkpoint (objects with state_dict() and
      load_state_dict(), tensors, JSON values), restored on resume like the model;
    - `stop_check_every`: agree on SIGTERM every n steps (None: about every
      STOP_CHECK_SECONDS, adapted to the measured step time);
    - `overlap_save`: let a save's snapshot copy run during the next forwards/backwards,
      so only the next optimizer.step() waits for it (CheckpointManager.save(overlap=True)).
      The snapshot must not change before then, so models with buffers (BatchNorm
      statistics change in forward) are refused, and extra_state tensors must be left
      alone until the next step boundary. Off by default: on CPU the copy competes with
      training for the same cores, so it shortens the stall but not the total cost
      (benchmarks/bench_save_stall.py).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Any,
        global_batch_size: int,
        micro_batch_size: int,
        max_steps: int,
        checkpoint: Checkpointer | None = None,
        save_every: int | None = None,
        seed: int = 0,
        scheduler: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        stop_check_every: int | None = None,
        overlap_save: bool = False,
    ) -> None:
        self.rank, self.world_size = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        if max_steps < 0:
            raise ConfigError(f"max_steps={max_steps}: it must be >= 0")
        if save_every is not None and save_every <= 0:
            raise ConfigError(f"save_every={save_every}: it must be >= 1, or None for no periodic saves")
        if stop_check_every is not None and stop_check_every <= 0:
            raise ConfigError(
                f"stop_check_every={stop_check_every}: it must be >= 1, or None to agree on "
                f"SIGTERM about every {STOP_CHECK_SECONDS} s"
            )
        if save_every is not None and checkpoint is None:
            raise ConfigError(f"save_every={save_every} needs a checkpoint manager: pass checkpoint=...")
        if overlap_save and checkpoint is None:
            raise ConfigError("overlap_save=True needs a checkpoint manager: pass checkpoint=...")
        buffers = [name for name, _ in model.named_buffers()]
        if overlap_save and buffers:
            raise ConfigError(
                f"overlap_save=True, but the model has buffers ({', '.join(buffers[:3])}"
                f"{', ...' if len(buffers) > 3 else ''}) that a forward pass may change while the "
                "snapshot is copied (BatchNorm statistics); use overlap_save=False"
            )
        self.sampler = ElasticSampler(len(dataset), global_batch_size, seed=seed)
        self.plan = AccumulationPlan(global_batch_size, micro_batch_size, self.world_size)
        if self.world_size > 1 and not (is_ddp(model) or is_fsdp2(model)):
            raise ConfigError(
                f"the model is a plain {type(model).__name__} at world size {self.world_size}: "
                "its gradients would not be averaged; wrap it in DistributedDataParallel or "
                "apply fully_shard first"
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.max_steps = max_steps
        self.save_every = save_every
        self.seed = seed
        self.checkpoint = checkpoint
        self.overlap_save = overlap_save

        self._loop_state = _LoopState()
        self._state: dict[str, Any] = {
            # The manager keys optimizer state by parameter names through the model and drops
            # DDP's "module." prefix; a checkpoint from another model fails its key check
            # (checkpoint.CheckpointMismatchError, naming the keys) before anything is loaded.
            "model": model,
            "optimizer": optimizer,
            "loop": self._loop_state,
        }
        if scheduler is not None:
            self._state["scheduler"] = scheduler
        for key, value in (extra_state or {}).items():
            if key in self._state:
                raise ConfigError(f"extra_state key {key!r} is reserved by the loop; rename it")
            self._state[key] = value

        self._set_commit_guard()
        if checkpoint is not None:  # commits and their stall reach the agent's events log
            checkpoint.set_commit_listener(report_commit)
        # Set when this worker can be reconfigured in-process: a plain DDP model (FSDP2's
        # sharding is bound to its mesh; comm hooks and mixed precision keep state of their
        # own), and a checkpoint to resume from exactly as the new ranks do.
        plain_ddp = is_ddp(model) and not model._comm_hooks and model.mixed_precision is None
        self._control = (os.environ.get(names.CONTROL_FILE) or None
                         if plain_ddp and checkpoint is not None else None)

        self._sigterm = False
        self._stop_check_every = stop_check_every
        self._place(self.rank, self.world_size)

        self._completed = 0
        self._resumed: int | None = None
        self._last_saved: int | None = None
        self._rng_at_boundary: TorchStreams | None = None  # set while a body runs

    def _place(self, rank: int, world_size: int) -> None:
        """Everything that follows from this rank's place in the process group."""
        self.rank, self.world_size = rank, world_size
        if self.plan.world_size != world_size:  # (a reconfiguration; __init__ built it already)
            self.plan = dataclasses.replace(self.plan, world_size=world_size)
        self.micro_batches = self.plan.micro_batches(rank)  # this rank's, the same every step
        self.rank_range = self.plan.rank_range(rank)
        # A separate gloo group carries the SIGTERM agreement and the RNG gather, so they never
        # queue behind (or between) the model's gradient buckets, and work under NCCL too.
        self._flag_group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._next_check = 0  # the completed-step count at which ranks next agree on SIGTERM
        self._last_check: tuple[int, float] | None = None  # (completed steps, perf_counter)

    def _set_commit_guard(self) -> None:
        guard = commit_guard_from_env()
        if guard is not None and self.checkpoint is not None:
            self.checkpoint.set_commit_guard(guard)

    @property
    def step(self) -> int:
        """Optimizer steps completed so far (the step a checkpoint taken now would carry)."""
        return self._completed

    def extra(self, name: str) -> Any:
        """The `extra_state` entry `name` as it is now: after a resume, JSON values are the
        loaded ones (objects and tensors are restored in place)."""
        if name in ("model", "optimizer", "loop", "scheduler") or name not in self._state:
            raise KeyError(f"{name!r} is not an extra_state entry of this loop")
        return self._state[name]

    def resume(self) -> int | None:
        """Load the latest committed checkpoint (once); return its step, or None."""
        if self._resumed is not None:
            return self._resumed if self._resumed >= 0 else None
        loaded = None if self.checkpoint is None else self.checkpoint.load(self._state)
        self._resumed = -1
        if loaded is None:
            log.info("rank %d: no checkpoint, starting at step 0", self.rank)
            return None
        self._apply_loop_state(loaded)
        self._resumed = self._completed = self._last_saved = loaded
        log.info("rank %d: resumed from step %d", self.rank, loaded)
        return loaded

    def save(self, metrics: Mapping[str, float] | None = None) -> None:
        """Checkpoint the state after `loop.step` completed steps (collective; async write)."""
        if self.checkpoint is None:
            raise ConfigError("loop.save() needs a checkpoint manager: pass checkpoint=... to TrainLoop")
        step = self._completed
        epoch, step_in_epoch = self.sampler.position(step)
        self._loop_state.values = {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_batch_size": self.plan.global_batch_size,
            "dataset_size": self.sampler.dataset_size,
            "seed": self.seed,
            "world_size": self.world_size,
            "rng": self._gather_rng(RngState.capture(self._rng_at_boundary)),
        }
        self.checkpoint.save(step, self._state, metrics=metrics, epoch=epoch, overlap=self.overlap_save)
        self._last_saved = step
        log.info("rank %d: saved step %d metrics %s", self.rank, step, metrics)

    def __iter__(self) -> Iterator[Step]:
        # Installed before the (possibly long) resume, so a SIGTERM during the load is
        # answered at the first boundary instead of killing the worker.
        previous = self._install_sigterm()
        try:
            self.resume()
            self._report_started()
            while self._completed < self.max_steps:
                if self._stop_agreed():
                    self._stop()  # exits, or returns with the loop placed in the next round
                    continue  # agree again, in the new group, as its new ranks do first
                step = Step(self, self.sampler.samples(self._completed))
                if self.checkpoint is not None:
                    self._rng_at_boundary = TorchStreams.capture()
                yield step
                self._rng_at_boundary = None
                self._finish(step)
            if self.checkpoint is not None:
                if self._last_saved != self._completed:
                    self.save()
                self.checkpoint.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    # -- step boundary --------------------------------------------------------------------

    def _report_started(self) -> None:
        report_progress(self._completed)
        if self._control is not None:
            report_reconfigurable()

    def _finish(self, step: Step) -> None:
        if not step._finished:
            raise TrainLoopUsageError(
                f"step {step.index}: the loop advanced before all {step.accumulation_steps} "
                "micro-batches were iterated; run `for batch in step:` to the end"
            )
        if self.overlap_save and self.checkpoint is not None:
            self.checkpoint.wait_snapshot()  # parameters must not change under the copy
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self._completed += 1
        report_progress(self._completed)
        if self.save_every is not None and self._completed % self.save_every == 0:
            self.save()

    def _install_sigterm(self) -> Any:
        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._sigterm = True

        try:
            return signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: preemption is then the caller's business
            log.warning("rank %d: TrainLoop not in the main thread; SIGTERM is not handled", self.rank)
            return None

    def _stop_agreed(self) -> bool:
        """Whether every rank stops now (called at each step boundary, same on all ranks).

        The ranks agree by a MAX all-reduce of [local SIGTERM flag, local mean step time]. A
        collective costs ranks a rendezvous, so it runs only every `stop_check_every` steps,
        or by default every STOP_CHECK_SECONDS of training: the interval to the next check is
        computed from the reduced (hence identical) step time, so all ranks check, and stop,
        after the same step.
        """
        if self._flag_group is None:
            return self._stop_wanted()
        if self._completed < self._next_check:
            return False
        now = time.perf_counter()
        mean = 0.0
        if self._last_check is not None and self._completed > self._last_check[0]:
            mean = (now - self._last_check[1]) / (self._completed - self._last_check[0])
        agreed = torch.tensor([float(self._stop_wanted()), mean], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._flag_group)
        self._last_check = (self._completed, now)
        self._next_check = self._completed + check_interval(agreed[1].item(), self._stop_check_every)
        return bool(agreed[0].item())

    def _stop_wanted(self) -> bool:
        """This rank's vote: SIGTERM, or its agent asks it to park (elastic/control.py)."""
        return self._sigterm or (self._control is not None and control.park_requested(self._control))

    def _stop(self) -> None:
        """Save the agreed step; exit on SIGTERM, else (peers stop or our agent asks) park
        and re-form the group in the next round, if this loop can."""
        parks = self._control is not None and not self._sigterm
        log.warning("rank %d: %s; saving step %d", self.rank,
                    "parking for a membership change" if parks else "preempted (SIGTERM), exiting", self._completed)
        if self.checkpoint is not None:
            if self._last_saved != self._completed:
                self.save()
            self.checkpoint.wait()
        if not parks:
            raise SystemExit(PREEMPTED_EXIT_CODE)
        report_parked(self._completed)
        self._rejoin(self._wait_for_round())

    def _wait_for_round(self) -> dict[str, str]:
        """The next round's environment, once the agent sends it; SIGTERM ends the wait."""
        while (env := control.read_assignment(self._control)) is None:
            if self._sigterm:
                log.warning("rank %d: SIGTERM while parked at step %d; exiting", self.rank, self._completed)
                raise SystemExit(PREEMPTED_EXIT_CODE)
            time.sleep(PARKED_POLL_SECONDS)
        return env

    def _rejoin(self, env: dict[str, str]) -> None:
        """Join the next round's process group and resume from the committed checkpoint of
        the parked step, as the round's fresh workers do (the same state, bitwise)."""
        parked = self._completed
        ctx = rejoin(env)
        # The collectives and groups of the new ranks' scripts, in the same order: DDP's
        # construction, the CheckpointManager's group, the loop's.
        _regroup_ddp(self.model)
        self.checkpoint.regroup()
        self._place(ctx.rank, ctx.world_size)
        self._set_commit_guard()  # the fence of the new round
        self._resumed = None
        self.resume()
        self._report_started()
        log.warning("rank %d of %d: reconfigured in round %d at step %d", ctx.rank, ctx.world_size,
                    ctx.round, parked)

    # -- resume ---------------------------------------------------------------------------

    def _gather_rng(self, snapshot: RngState) -> list[Any]:
        local = snapshot.to_json()
        if self._flag_group is None:
            return [local]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self._flag_group)
        return gathered

    def _apply_loop_state(self, step: int) -> None:
        saved = self._loop_state.values
        expected = {
            "global_batch_size": self.plan.global_batch_size,
            "dataset_size": self.sampler.dataset_size,
            "seed": self.seed,
        }
        different = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if different:
            detail = ", ".join(f"{k}: checkpoint {a} != now {b}" for k, (a, b) in different.items())
            raise StateMismatchError(
                f"the checkpoint of step {step} was written with another sample order ({detail}); "
                "resuming would change which samples each step sees: use the same global batch "
                "size, dataset and seed, or a new checkpoint directory"
            )
        if saved.get("step") != step:
            raise StateMismatchError(
                f"the checkpoint of step {step} records loop step {saved.get('step')}; it is "
                "inconsistent, remove it or resume from another step"
            )
        rng = saved["rng"]
        if self.rank < len(rng):
            RngState.from_json(rng[self.rank]).restore(f"the checkpoint of step {step}")
        else:
            # A rank that did not exist when the checkpoint was written gets a fresh,
            # deterministic stream rather than a copy of another rank's.
            seed_all(self.seed + 1_000_003 * self.rank + step)
