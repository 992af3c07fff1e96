"""The elastic sampler: a global sample order that does not depend on the world size.

Epoch e uses one permutation of range(len(dataset)) drawn from (seed, e). Step s of the
epoch consumes positions [s*G, (s+1)*G) of that permutation, whatever the world size, so
the resume state is just (epoch, step in epoch) and a restart or resize changes only who
computes on which sample, never which samples a step sees.

End of an epoch: when len(dataset) is not a multiple of G, the last len(dataset) % G
samples of the epoch's permutation are dropped, so every step has exactly G samples and
the loss scaling stays exact. The permutation changes each epoch, so a different tail is
dropped each time and no sample is excluded for good.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elastic.errors import ConfigError


@dataclass(frozen=True)
class StepSamples:
    """The G sample ids of one global step, in global-batch order."""

    step: int  # global optimizer step, counted from 0 over all epochs
    epoch: int
    step_in_epoch: int
    ids: tuple[int, ...]


class ElasticSampler:
    """Deterministic per-epoch order of `dataset_size` samples, consumed G per step.

    `position(step)` and `step_at(epoch, step_in_epoch)` convert between the global step
    counter and the (epoch, step in epoch) resume state; `samples(step)` gives the ids.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, *, seed: int = 0) -> None:
        if global_batch_size <= 0:
            raise ConfigError(
                f"global_batch_size={global_batch_size}: it must be a positive number of "
                "samples per optimizer step"
            )
        if dataset_size < global_batch_size:
            raise ConfigError(
                f"the dataset has {dataset_size} samples, fewer than global_batch_size="
                f"{global_batch_size}: one step needs G distinct samples; use a larger "
                "dataset or a smaller global batch"
            )
        if seed < 0:
            raise ConfigError(f"seed={seed}: it must be >= 0 (numpy SeedSequence entropy)")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step in epoch) of global step `step`."""
        if step < 0:
            raise ConfigError(f"step={step}: steps are counted from 0")
        return divmod(step, self.steps_per_epoch)

    def step_at(self, epoch: int, step_in_epoch: int) -> int:
        """Global step of (epoch, step in epoch); inverse of `position`."""
        if not 0 <= step_in_epoch < self.steps_per_epoch or epoch < 0:
            raise ConfigError(
                f"(epoch={epoch}, step_in_epoch={step_in_epoch}) is not a position of this "
                f"sampler: an epoch has {self.steps_per_epoch} steps"
            )
        return epoch * self.steps_per_epoch + step_in_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sample ids for `epoch` (read-only; cached for the current epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        # SeedSequence mixes (seed, epoch) properly; seed*K + epoch would collide.
        order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
        order.setflags(write=False)
        self._cache = (epoch, order)
        return order

    def samples(self, step: int) -> StepSamples:
        epoch, s = self.position(step)
        g = self.global_batch_size
        ids = self.epoch_order(epoch)[s * g : (s + 1) * g]
        return StepSamples(step=step, epoch=epoch, step_in_epoch=s, ids=tuple(ids.tolist()))
