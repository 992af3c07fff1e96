"""`TrainLoop`: the training loop users write against, so restarts and resizes are invisible.

Call order (every rank runs the same sequence):
  1. `TrainLoop(...)` checks the options and computes the accumulation plan (no I/O).
  2. The first `iter(loop)` (or `loop.resume()`) loads the latest committed checkpoint, if
     any, through the CheckpointManager (a collective: all ranks load together).
  3. Each iteration yields a `Step`; iterating the Step yields this rank's A micro-batches;
     the user calls `step.backward(loss)` once per micro-batch.
  4. When the loop advances: unscale, hook, clip, optimizer.step() (optimizer_step.py),
     zero_grad(), scheduler.step(), the progress file, the preemption check, and the
     periodic checkpoint.
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

Options (keyword-only; the names are the contract):
- `checkpoint`: a CheckpointManager, or None to train without checkpoints;
- `save_every`: also save after every n-th optimizer step (None: only at the end, on
  SIGTERM and when `save()` is called);
- `memory_save_every`: also save into the checkpoint manager's memory tier (node RAM,
  `CheckpointManager(memory_tier=True)`) after every n-th step that is not a durable save, so
  a failure loses at most n steps and a restart reads memory, not storage (checkpoint/memory_tier.py);
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
  (benchmarks/bench_save_stall.py);
- `num_workers`, `prefetch_factor`, `pin_memory`, `persistent_workers`, `worker_init_fn`:
  as for torch.utils.data.DataLoader, which loads this rank's micro-batches (batches.py);
  the samples and their order do not depend on them, and the loader's worker processes
  end with the loop (its end, an error, SIGTERM) or are rebuilt for a new world size.
  `dataset` must be map-style (len() and [i]). Random augmentation in `dataset[i]` must be
  seeded by the sample, not by a process's global stream: `i` is an int with an `epoch`
  attribute, and `elastic.sample_generator(seed, i.epoch, i)` is a torch.Generator seeded
  from (seed, epoch, sample id) only, the same for any worker count, world size or restart;
- `device`: move every tensor of a batch (in tuples, lists, dicts, dataclasses,
  namedtuples) there; non_blocking when `pin_memory`;
- `grad_scaler`: a torch.amp.GradScaler: step.backward scales the loss, and the scaler's
  state is checkpointed. A step it skips (inf/NaN gradients) takes no optimizer or
  scheduler step and does not advance `loop.step` or `step.index`, but consumes its
  samples (the next step takes the next ones); the progress record counts the skips;
- `on_before_optimizer_step(step)`: called with the final gradients (after the scaler
  unscaled them, before clipping), as in Lightning (optimizer_step.py);
- `clip_grad_norm`: clip the global gradient norm (of the exact global mean, after DDP's
  all-reduce; DTensor gradients under FSDP2) to this value; `step.grad_norm` holds the
  norm before clipping once the loop advanced past the step.
A torch.compile'd model (of a DDP, FSDP2 or plain module) works as the module it wraps.
The sample order is a seeded Feistel permutation per epoch (sampler.py), not the full
permutation earlier releases drew: their checkpoints resume at the same (epoch, step) in
the new order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from elastic.errors import ConfigError
from elastic.worker.accumulation import AccumulationPlan, is_ddp, is_fsdp2, unwrap_compiled
from elastic.worker.batches import LoaderOptions, MicroBatches, check_map_style
from elastic.worker.context import open_progress_file, report_commit, report_progress, report_restored
from elastic.worker.fencing import commit_guard_from_env
from elastic.worker.loop_state import RESERVED, Checkpointer, LoopState, SampleOrder, checkpoint_state
from elastic.worker.optimizer_step import OptimizerStep
from elastic.worker.reconfigure import Reconfiguration
from elastic.worker.rng_state import RngState, TorchStreams
from elastic.worker.sampler import ElasticSampler
from elastic.worker.save_cadence import SaveCadence
from elastic.worker.step import Step
from elastic.worker.stop_agreement import PREEMPTED_EXIT_CODE, STOP_CHECK_SECONDS, StopAgreement

log = logging.getLogger(__name__)


class TrainLoop:
    """Owns the step counter, the elastic sampler, accumulation, checkpoints and resume.

    Not thread-safe; one per process, created on every rank (it makes a small gloo group).
    All options are keyword-only and checked here, at the boundary; the module docstring
    says what each one does (data loading and seeded augmentation under `num_workers`).
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
        checkpoint: Checkpointer | None = None, save_every: int | None = None, memory_save_every: int | None = None,
        seed: int = 0, scheduler: Any = None, collate_fn: Callable[[list[Any]], Any] | None = None,
        extra_state: Mapping[str, Any] | None = None, stop_check_every: int | None = None,
        overlap_save: bool = False,
        num_workers: int = 0, prefetch_factor: int | None = None, pin_memory: bool = False,
        persistent_workers: bool = False, worker_init_fn: Callable[[int], None] | None = None,
        device: torch.device | str | None = None,
        clip_grad_norm: float | None = None, grad_scaler: torch.amp.GradScaler | None = None,
        on_before_optimizer_step: Callable[[Step], None] | None = None,
    ) -> None:
        self.rank, self.world_size = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        module = unwrap_compiled(model)  # what the loop inspects, syncs and checkpoints
        self.plan = AccumulationPlan(global_batch_size, micro_batch_size, self.world_size)
        _check_options(module, checkpoint, max_steps, stop_check_every, overlap_save, self.world_size)
        self.cadence = SaveCadence.checked(checkpoint, save_every, memory_save_every)
        check_map_style(dataset)
        self._loader_options = LoaderOptions(num_workers, prefetch_factor, pin_memory, persistent_workers,
                                             worker_init_fn, device)
        self._optimizer_step = OptimizerStep(module, optimizer, scheduler, grad_scaler=grad_scaler,
                                             clip_grad_norm=clip_grad_norm,
                                             on_before_optimizer_step=on_before_optimizer_step)
        self.sampler = ElasticSampler(len(dataset), global_batch_size, seed=seed)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.max_steps = max_steps
        self.seed = seed
        self.checkpoint = checkpoint
        self.overlap_save = overlap_save

        self._loop_state = LoopState(SampleOrder(self.plan.global_batch_size, self.sampler.dataset_size, seed))
        self._state = checkpoint_state(module, optimizer, self._loop_state, scheduler, grad_scaler, extra_state)

        open_progress_file()  # steps, commits and the restored tier reach the agent, with or without elastic.init()
        if checkpoint is not None:  # commits and their stall reach the agent's events log
            checkpoint.set_commit_listener(report_commit)
        self._reconfiguration = Reconfiguration.for_worker(module, checkpoint)
        control_file = None if self._reconfiguration is None else self._reconfiguration.control_file
        self._stop = StopAgreement(every=stop_check_every, control_file=control_file)
        self._place(self.rank, self.world_size)

        self._completed = 0
        self._skipped = 0  # steps the grad scaler skipped: they consumed their samples
        self._batches: MicroBatches | None = None  # this placement's loader, from the resume point
        self._resumed: int | None = None
        self._last_saved: int | None = None  # the newest step saved durably
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
        self._skipped = self._loop_state.restore(loaded, self.rank)
        self._resumed = self._completed = loaded
        self._last_saved = _durable_step(self.checkpoint, loaded)
        log.info("rank %d: resumed from step %d", self.rank, loaded)
        return loaded

    def save(self, metrics: Mapping[str, float] | None = None, *, durable: bool = True) -> None:
        """Checkpoint the state after `loop.step` completed steps (collective; async write).
        `durable=False`: into the checkpoint manager's memory tier only (memory_tier=True)."""
        if self.checkpoint is None:
            raise ConfigError("loop.save() needs a checkpoint manager: pass checkpoint=... to TrainLoop")
        step = self._completed
        epoch, step_in_epoch = self.sampler.position(step + self._skipped)
        self._loop_state.capture(step, self._skipped, epoch, step_in_epoch, RngState.capture(self._rng_at_boundary),
                                 self._group, self.world_size)
        self.checkpoint.save(step, self._state, metrics=metrics, epoch=epoch, overlap=self.overlap_save,
                             durable=durable)
        self._last_saved = step if durable else self._last_saved
        log.info("rank %d: saved step %d%s metrics %s", self.rank, step, "" if durable else " (memory)", metrics)

    def __iter__(self) -> Iterator[Step]:
        # Installed before the (possibly long) resume: a SIGTERM during the load is answered at the first boundary.
        with self._stop.sigterm_handled(self.rank):
            self.resume()
            self._report_started()
            try:
                while self._completed < self.max_steps:
                    if self._stop.agreed(self._completed):
                        self._stop_here()  # exits, or returns with the loop placed in the next round
                        continue  # agree again, in the new group, as its new ranks do first
                    position = self._completed + self._skipped
                    if self._batches is None:  # after a resume or a reconfiguration
                        self._batches = MicroBatches(self, position)
                    step = Step(self, self._completed, position)
                    if self.checkpoint is not None:
                        self._rng_at_boundary = TorchStreams.capture()
                    yield step
                    self._rng_at_boundary = None
                    self._finish(step)
                self._commit_last()
            finally:  # also on SIGTERM's exit, an error, or a loop the caller left
                self._close_batches()

    def _close_batches(self) -> None:  # ends the loader's workers; the next step makes a new one
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    # -- step boundary --------------------------------------------------------------------

    def _report_started(self) -> None:
        report_progress(self._completed, self._skipped)
        if self._reconfiguration is not None:
            self._reconfiguration.declare()

    def _finish(self, step: Step) -> None:
        step.check_iterated()
        if self.overlap_save and self.checkpoint is not None:
            self.checkpoint.wait_snapshot()  # parameters must not change under the copy
        taken, step.grad_norm = self._optimizer_step.take(step)
        self._completed += taken
        self._skipped += not taken  # the skipped step consumed its samples: the next takes the next ones
        report_progress(self._completed, self._skipped)
        durable = self.cadence.due(self._completed) if taken else None
        if durable is not None:
            self.save(durable=durable)

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
        self._close_batches()  # the next round's loader serves the new rank's share
        # Join the next round; resume from the parked step's checkpoint as its fresh workers do (bitwise).
        parked = self._completed
        ctx = self._reconfiguration.park(parked, self._stop, self.rank)
        self._place(ctx.rank, ctx.world_size)
        self._resumed = None
        self.resume()
        self._report_started()
        log.warning("rank %d of %d: reconfigured in round %d at step %d", ctx.rank, ctx.world_size,
                    ctx.round, parked)


def _durable_step(checkpoint: Checkpointer | None, loaded: int) -> int | None:
    """`loaded` if the resume read it from durable storage (a memory checkpoint is not durable
    yet: the final save must still write it); tells the agent the tier."""
    restored = getattr(checkpoint, "restored", None)
    if restored is None:
        return loaded
    report_restored(restored.tier, restored.peer_bytes)
    return loaded if restored.tier == "durable" else None


def _check_options(model: torch.nn.Module, checkpoint: Checkpointer | None, max_steps: int,
                   stop_check_every: int | None, overlap_save: bool,
                   world_size: int) -> None:
    """The constructor's checks of the options that need nothing built yet."""
    if world_size > 1 and not (is_ddp(model) or is_fsdp2(model)):
        raise ConfigError(
            f"the model is a plain {type(model).__name__} at world size {world_size}: "
            "its gradients would not be averaged; wrap it in DistributedDataParallel or "
            "apply fully_shard first"
        )
    if max_steps < 0:
        raise ConfigError(f"max_steps={max_steps}: it must be >= 0")
    if stop_check_every is not None and stop_check_every <= 0:
        raise ConfigError(
            f"stop_check_every={stop_check_every}: it must be >= 1, or None to agree on "
            f"SIGTERM about every {STOP_CHECK_SECONDS} s"
        )
    if overlap_save and checkpoint is None:
        raise ConfigError("overlap_save=True needs a checkpoint manager: pass checkpoint=...")
    buffers = [name for name, _ in model.named_buffers()]
    if overlap_save and buffers:
        raise ConfigError(
            f"overlap_save=True, but the model has buffers ({', '.join(buffers[:3])}"
            f"{', ...' if len(buffers) > 3 else ''}) that a forward pass may change while the "
            "snapshot is copied (BatchNorm statistics); use overlap_save=False"
        )
