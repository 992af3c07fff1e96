"""The loop's data path: this rank's micro-batches, loaded by a torch DataLoader.

The sampler (sampler.py) and the accumulation plan (accumulation.py) fix which sample ids each
of this rank's micro-batches holds; `StepBatchSampler` yields exactly those id lists, step
after step from the resume point, to a `torch.utils.data.DataLoader(dataset,
batch_sampler=...)`. Worker processes, prefetching and pinned memory are the DataLoader's, and
the ids stay a pure function of (seed, epoch, step, G, m, W): how many workers load them, or
how often the job restarted, changes nothing. With num_workers=0 the DataLoader indexes the
dataset in the training thread, as a plain loop would.

Random augmentation inside `dataset[i]` must not draw from a process's global streams (each
loader worker has its own, seeded by worker id): the index the loop passes is an int with an
`epoch` attribute, and `sample_generator(seed, i.epoch, i)` is a generator seeded by the
sample alone.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from elastic.errors import ConfigError
from elastic.worker.accumulation import MicroBatch
from elastic.worker.sampler import ElasticSampler

if TYPE_CHECKING:
    from elastic.worker.train_loop import TrainLoop


class SampleIndex(int):
    """A sample id as passed to `dataset[i]`, with the epoch it is drawn in (`i.epoch`)."""

    epoch: int

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def of_epoch(epoch: int) -> type[SampleIndex]:
        """The type of epoch `epoch`'s indices: the epoch is a class attribute, so making an
        index is a plain int construction (hundreds per step)."""
        return type("SampleIndex", (SampleIndex,), {"epoch": epoch, "__slots__": ()})

    def __reduce__(self) -> tuple[Any, ...]:  # to loader workers: the base type and the epoch
        return _sample_index, (int(self), self.epoch)


def _sample_index(sample_id: int, epoch: int) -> SampleIndex:
    return SampleIndex.of_epoch(epoch)(sample_id)


def sample_generator(seed: int, epoch: int, sample_id: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, sample_id) only: the same augmentation of
    a sample in an epoch whatever the worker count, the world size or the restarts."""
    state = np.random.SeedSequence([seed, epoch, int(sample_id)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class LoaderOptions:
    """The DataLoader options TrainLoop passes through (same names and meanings), and the
    device batches are moved to."""

    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = False
    persistent_workers: bool = False
    worker_init_fn: Callable[[int], None] | None = None
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: it must be >= 0 (0 loads in the training thread)")
        if self.num_workers == 0 and (self.prefetch_factor is not None or self.persistent_workers):
            raise ConfigError(
                "prefetch_factor and persistent_workers need loader worker processes: pass num_workers >= 1"
            )
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor={self.prefetch_factor}: it must be >= 1")


def check_map_style(dataset: Any) -> None:
    """The loop picks samples by id: it needs len(dataset) and dataset[i]."""
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(
            f"the dataset is a {type(dataset).__name__} without len() and [i]: TrainLoop picks samples "
            "by id to resume and resize exactly; pass a map-style view (for example a memory-mapped "
            "token array cut into fixed-length samples)"
        )


class StepBatchSampler:
    """This rank's micro-batch id lists, A per step, for the sample-order positions from
    `start` on (a rank whose share is shorter than A gets zero-weight repeats of its first
    sample, as Step describes)."""

    def __init__(self, sampler: ElasticSampler, micro_batches: Sequence[MicroBatch],
                 rank_range: tuple[int, int], start: int) -> None:
        self._sampler = sampler
        self._micro_batches = micro_batches
        self._rank_range = rank_range
        self._start = start

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        position = self._start
        first, stop = self._rank_range
        while True:
            index = SampleIndex.of_epoch(self._sampler.position(position)[0])
            ids = list(map(index, self._sampler.ids(position, first, stop)))  # this rank's share
            for mb in self._micro_batches:
                yield ids[mb.start - first : mb.stop - first] or ids[:1]
            position += 1


class MicroBatches:
    """A loop's loader for its current place (rank, world size) from sample-order position
    `start`; close() ends its worker processes."""

    def __init__(self, loop: TrainLoop, start: int) -> None:
        options = loop._loader_options
        self._device = None if options.device is None else torch.device(options.device)
        self._non_blocking = options.pin_memory
        batch_sampler = StepBatchSampler(loop.sampler, loop.micro_batches, loop.rank_range, start)
        loader = DataLoader(
            loop.dataset, batch_sampler=batch_sampler, collate_fn=loop.collate_fn, num_workers=options.num_workers,
            prefetch_factor=options.prefetch_factor, pin_memory=options.pin_memory,
            persistent_workers=options.persistent_workers,
            worker_init_fn=functools.partial(_init_loader_worker, options.worker_init_fn),
            # Its own generator: the loader's base seed must not draw from the global torch
            # stream, which a bitwise resume restores and the model's dropout uses.
            generator=torch.Generator().manual_seed(loop.seed),
        )
        self._iterator = iter(loader)
        if options.num_workers:  # before multiprocessing's exit hook, which would wait forever for them
            atexit.register(self.close)

    def next(self) -> Any:
        batch = next(self._iterator)
        return batch if self._device is None else move_to(batch, self._device, self._non_blocking)

    def close(self) -> None:
        """Shut the loader's worker processes down (a no-op without workers)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            atexit.unregister(self.close)


def _init_loader_worker(worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    """Loader workers ignore SIGTERM: launchers (elastic-run, torchrun) and Slurm send it to the
    training process's whole process group, and a worker it ended would make the DataLoader
    raise in the training process before the loop saves the step it stops at. The training
    process ends its workers (close(), also at exit); a worker outliving it exits by itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def move_to(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """`batch` with every tensor in it (tuples, lists, dicts, dataclasses, namedtuples) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return type(batch)({k: move_to(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, non_blocking) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to(getattr(batch, f.name), device, non_blocking)
                   for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch
