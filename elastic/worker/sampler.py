"""The elastic sampler: a global sample order that does not depend on the world size.

Epoch e uses one pseudo-random permutation of range(len(dataset)) drawn from (seed, e). Step s
of the epoch consumes positions [s*G, (s+1)*G) of that permutation, whatever the world size,
so the resume state is just (epoch, step in epoch) and a restart or resize changes only who
computes on which sample, never which samples a step sees.

The permutation is never materialised: position p of epoch e is sent through a keyed Feistel
network over the next power of two >= N (a bijection of [0, 2^b)), and values >= N walk
the cycle again until they land in range (cycle walking keeps it a bijection of [0, N); since
2^b < 2N a walk takes fewer than 2 tries on average). Memory is O(G) per step at any N, and
a step's ids cost under 10 us per id for a few ids (Python ints) and under 1 us per id for
hundreds (numpy), at 10^10 samples as at 10^3 (benchmarks/bench_data_loading.py). A rank
computes only its own share of a step (`ids`). The order differs from releases that drew a full
numpy permutation per epoch: a checkpoint of such a release resumes at its (epoch, step)
with the new order, so the rest of that epoch may repeat or skip some samples, once.

End of an epoch: when len(dataset) is not a multiple of G, the last len(dataset) % G
positions of the epoch are dropped, so every step has exactly G samples and the loss scaling
stays exact. The permutation changes each epoch, so a different tail is dropped each time
and no sample is excluded for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from elastic.errors import ConfigError

FEISTEL_ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudo-random function make a pseudo-random permutation
VECTOR_FROM = 64  # positions from which numpy arrays beat a loop over Python ints


@dataclass(frozen=True)
class StepSamples:
    """The G sample ids of one global step, in global-batch order."""

    step: int  # position of the step in the sample order, counted from 0 over all epochs
    epoch: int
    step_in_epoch: int
    ids: tuple[int, ...]


class FeistelPermutation:
    """A seeded bijection of [0, n) evaluated per index: O(1) memory, identical everywhere.

    An unbalanced Feistel network over b = bit length of n-1 bits (a bijection of [0, 2^b),
    2^b < 2n), with cycle walking for the values >= n.
    """

    def __init__(self, n: int, key: tuple[int, ...]) -> None:
        bits = max(2, (n - 1).bit_length())
        self.n = n
        self._widths = (bits // 2, bits - bits // 2)  # (left, right); they swap every round
        self._keys = [int(k) for k in np.random.SeedSequence(list(key)).generate_state(FEISTEL_ROUNDS, np.uint64)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of `positions` (int64 array of values in [0, n))."""
        if positions.size < VECTOR_FROM:  # numpy's per-call overhead exceeds the work
            return np.array([self.at(int(p)) for p in positions], dtype=np.int64)
        out = self._encrypt(positions.astype(np.uint64))
        walking = np.flatnonzero(out >= self.n)
        while walking.size:
            out[walking] = self._encrypt(out[walking])
            walking = walking[out[walking] >= self.n]
        return out.astype(np.int64)

    def at(self, position: int) -> int:
        """The image of one position."""
        out = self._encrypt(position)
        while out >= self.n:
            out = self._encrypt(out)
        return out

    def _encrypt(self, x: Any) -> Any:
        """One pass of the network over [0, 2^b), on a Python int or a uint64 array alike."""
        left_bits, right_bits = self._widths
        left, right = x >> right_bits, x & ((1 << right_bits) - 1)
        for key in self._keys:  # an even number of rounds: the widths end where they started
            left, right = right, left ^ (_mix(right ^ key) & ((1 << left_bits) - 1))
            left_bits, right_bits = right_bits, left_bits
        return (left << right_bits) | right


_U64 = (1 << 64) - 1


def _mix(z: Any) -> Any:
    """splitmix64's finaliser, modulo 2^64."""
    z = _wrap((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9)
    z = _wrap((z ^ (z >> 27)) * 0x94D049BB133111EB)
    return z ^ (z >> 31)


def _wrap(z: Any) -> Any:
    """Modulo 2^64: uint64 arrays wrap by themselves (a mask would cost one more pass)."""
    return z & _U64 if isinstance(z, int) else z


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
        if dataset_size >= 1 << 62:
            raise ConfigError(f"the dataset has {dataset_size} samples; at most 2^62 are supported")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._epoch: tuple[int, FeistelPermutation] | None = None  # the current epoch's

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

    def permutation(self, epoch: int) -> FeistelPermutation:
        """The order of `epoch`: position -> sample id."""
        if self._epoch is None or self._epoch[0] != epoch:
            # SeedSequence mixes (seed, epoch) properly; seed*K + epoch would collide.
            self._epoch = (epoch, FeistelPermutation(self.dataset_size, (self.seed, epoch)))
        return self._epoch[1]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole permutation of `epoch`, materialised (N ids: for small datasets and tests)."""
        return self.permutation(epoch)(np.arange(self.dataset_size, dtype=np.int64))

    def samples(self, step: int) -> StepSamples:
        epoch, s = self.position(step)
        return StepSamples(step=step, epoch=epoch, step_in_epoch=s, ids=tuple(self.ids(step)))

    def ids(self, step: int, start: int = 0, stop: int | None = None) -> list[int]:
        """The sample ids at positions [start, stop) of step `step`'s global batch (default:
        all G); a rank computes only its share."""
        epoch, s = self.position(step)
        first = s * self.global_batch_size
        stop = self.global_batch_size if stop is None else stop
        return self.permutation(epoch)(np.arange(first + start, first + stop, dtype=np.int64)).tolist()
