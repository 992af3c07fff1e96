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
     step, saves it, waits for the commit and exits with code 143 (stop_agreement.py).
  6. Under `elastic-run --reconfigure`, a DDP loop with a checkpoint manager is reconfigured
     in-process on a planned membership change (growth, a peer leaving; elastic/exchange/control.py):
     at the same agreement as for SIGTERM it saves the step, parks until its agent hands it the
     next round, re-forms the process group (reconfigure.py), and resumes from that
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from elastic.errors import ConfigError, TrainLoopUsageError
from elastic.worker.accumulation import AccumulationPlan, MicroBatch, gradient_sync, is_ddp, is_fsdp2
from elastic.worker.context import report_commit, report_progress
from elastic.worker.fencing import commit_guard_from_env
from elastic.worker.loop_state import RESERVED, Checkpointer, LoopState, SampleOrder, checkpoint_state
from elastic.worker.reconfigure import Reconfiguration
from elastic.worker.rng_state import RngState, TorchStreams
from elastic.worker.sampler import ElasticSampler, StepSamples
from elastic.worker.stop_agreement import PREEMPTED_EXIT_CODE, STOP_CHECK_SECONDS, StopAgreement

log = logging.getLogger(__name__)


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
        _check_options(model, checkpoint, max_steps, save_every, stop_check_every, overlap_save)
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

        self._loop_state = LoopState(SampleOrder(self.plan.global_batch_size, self.sampler.dataset_size, seed))
        self._state = checkpoint_state(model, optimizer, self._loop_state, scheduler, extra_state)

        if checkpoint is not None:  # commits and their stall reach the agent's events log
            checkpoint.set_commit_listener(report_commit)
        self._reconfiguration = Reconfiguration.for_worker(model, checkpoint)
        control_file = None if self._reconfiguration is None else self._reconfiguration.control_file
        self._stop = StopAgreement(every=stop_check_every, control_file=control_file)
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
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._stop.restart(self._group)
        guard = commit_guard_from_env()  # the fence of this rank's round
        if guard is not None and self.checkpoint is not None:
            self.checkpoint.set_commit_guard(guard)

    @property
    def step(self) -> int:
        """Optimizer steps completed so far (the step a checkpoint taken now would carry)."""
        return self._completed

    def extra(self, name: str) -> Any:
        """The `extra_state` entry `name` as it is now: after a resume, JSON values are the
        loaded ones (objects and tensors are restored in place)."""
        if name in RESERVED or name not in self._state:
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
        self._loop_state.restore(loaded, self.rank)
        self._resumed = self._completed = self._last_saved = loaded
        log.info("rank %d: resumed from step %d", self.rank, loaded)
        return loaded

    def save(self, metrics: Mapping[str, float] | None = None) -> None:
        """Checkpoint the state after `loop.step` completed steps (collective; async write)."""
        if self.checkpoint is None:
            raise ConfigError("loop.save() needs a checkpoint manager: pass checkpoint=... to TrainLoop")
        step = self._completed
        epoch, step_in_epoch = self.sampler.position(step)
        self._loop_state.capture(step, epoch, step_in_epoch, RngState.capture(self._rng_at_boundary), self._group,
                                 self.world_size)
        self.checkpoint.save(step, self._state, metrics=metrics, epoch=epoch, overlap=self.overlap_save)
        self._last_saved = step
        log.info("rank %d: saved step %d metrics %s", self.rank, step, metrics)

    def __iter__(self) -> Iterator[Step]:
        # Installed before the (possibly long) resume, so a SIGTERM during the load is
        # answered at the first boundary instead of killing the worker.
        with self._stop.sigterm_handled(self.rank):
            self.resume()
            self._report_started()
            while self._completed < self.max_steps:
                if self._stop.agreed(self._completed):
                    self._stop_here()  # exits, or returns with the loop placed in the next round
                    continue  # agree again, in the new group, as its new ranks do first
                step = Step(self, self.sampler.samples(self._completed))
                if self.checkpoint is not None:
                    self._rng_at_boundary = TorchStreams.capture()
                yield step
                self._rng_at_boundary = None
                self._finish(step)
            self._commit_last()

    # -- step boundary --------------------------------------------------------------------

    def _report_started(self) -> None:
        report_progress(self._completed)
        if self._reconfiguration is not None:
            self._reconfiguration.declare()

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

    def _commit_last(self) -> None:
        """Save the current step unless it is saved already, and wait for the commit."""
        if self.checkpoint is not None:
            if self._last_saved != self._completed:
                self.save()
            self.checkpoint.wait()

    def _stop_here(self) -> None:
        """Save the agreed step; exit on SIGTERM, else (peers stop or our agent asks) park
        and re-form the group in the next round, if this loop can."""
        parks = self._reconfiguration is not None and not self._stop.sigterm
        log.warning("rank %d: %s; saving step %d", self.rank,
                    "parking for a membership change" if parks else "preempted (SIGTERM), exiting", self._completed)
        self._commit_last()
        if not parks:
            raise SystemExit(PREEMPTED_EXIT_CODE)
        # Join the next round and resume from the committed checkpoint of the parked step, as
        # the round's fresh workers do (the same state, bitwise).
        parked = self._completed
        ctx = self._reconfiguration.park(parked, self._stop, self.rank)
        self._place(ctx.rank, ctx.world_size)
        self._resumed = None
        self.resume()
        self._report_started()
        log.warning("rank %d of %d: reconfigured in round %d at step %d", ctx.rank, ctx.world_size,
                    ctx.round, parked)


def _check_options(model: torch.nn.Module, checkpoint: Checkpointer | None, max_steps: int,
                   save_every: int | None, stop_check_every: int | None, overlap_save: bool) -> None:
    """The constructor's checks of the options that need nothing built yet."""
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
