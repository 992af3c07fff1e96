"""`Step`: one global optimizer step as one rank sees it (its micro-batches, its backward)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from elastic.errors import TrainLoopUsageError
from elastic.worker.accumulation import MicroBatch, gradient_sync

if TYPE_CHECKING:
    from elastic.worker.train_loop import TrainLoop


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

    def __init__(self, loop: TrainLoop, index: int, position: int) -> None:
        self._loop = loop
        self._index = index
        self._position = position  # in the sample order: index plus the steps the grad scaler skipped
        self._epoch, self._step_in_epoch = loop.sampler.position(position)
        # With clip_grad_norm: the global norm before clipping, set when the loop advances past the step.
        self.grad_norm: torch.Tensor | None = None
        self._micro_batches = loop.micro_batches
        self._current: MicroBatch | None = None
        self._backward_calls = 0
        self._finished = False

    @property
    def index(self) -> int:
        """Global optimizer step, from 0; equals the number of steps completed before it."""
        return self._index

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step_in_epoch(self) -> int:
        return self._step_in_epoch

    @property
    def world_size(self) -> int:
        return self._loop.world_size

    @property
    def accumulation_steps(self) -> int:
        return self._loop.plan.accumulation_steps

    @property
    def global_sample_ids(self) -> tuple[int, ...]:
        """The G sample ids of this step, in global-batch order (same on every rank)."""
        return self._global_ids

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """The sample ids this rank consumes in this step (zero-weight repeats excluded)."""
        start, stop = self._loop.rank_range
        return self._global_ids[start:stop]

    @functools.cached_property
    def _global_ids(self) -> tuple[int, ...]:  # computed when asked: the loader has its own
        return tuple(self._loop.sampler.ids(self._position))

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
        for mb in self._micro_batches:
            batch = loop._batches.next()  # the ids of `mb` (batches.StepBatchSampler), loaded
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

    def check_iterated(self) -> None:
        """Before the optimizer step: every micro-batch was run."""
        if not self._finished:
            raise TrainLoopUsageError(
                f"step {self.index}: the loop advanced before all {self.accumulation_steps} "
                "micro-batches were iterated; run `for batch in step:` to the end"
            )

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
        self._loop._optimizer_step.scale(loss * mb.weight).backward()
        self._backward_calls += 1
