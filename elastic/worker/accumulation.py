"""The accumulation plan: how one global batch of G samples is split over W ranks and
A micro-steps, and how much each micro-batch's loss counts.

The plan is a pure function of (G, m, W), so every rank computes the same plan without
talking to the others, and a restart at the same world size reproduces it exactly.

Layout. The G positions of a global batch are cut into W contiguous, balanced rank chunks
(the first G % W ranks get one sample more); each chunk is cut into A balanced micro-batches
(the first ones get one sample more). A = ceil(G / (m*W)) guarantees every micro-batch has
at most m samples. A micro-batch is empty only when its rank's chunk is shorter than A,
which needs G >= W (checked) to leave every rank at least one sample.

Weights. The user's loss is a mean over the micro-batch; step.backward multiplies it by
size * W / G. Summed over a rank's micro-batches that is (W/G) * (sum of per-sample loss
gradients on the rank); DDP and FSDP2 average over W ranks, which leaves exactly the mean
over the G samples.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from elastic.errors import ConfigError

try:  # FSDP2's public home since torch 2.6; older releases keep it under _composable.
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - depends on the torch release
    from torch.distributed._composable.fsdp import FSDPModule as _FSDPModule


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one rank: positions [start, stop) of the global batch."""

    index: int
    start: int
    stop: int
    weight: float  # multiplies the micro-batch's mean loss; 0.0 for an empty micro-batch

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class AccumulationPlan:
    """Split of a global batch of `global_batch_size` samples over `world_size` ranks."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    def __post_init__(self) -> None:
        g, m, w = self.global_batch_size, self.micro_batch_size, self.world_size
        if m <= 0:
            raise ConfigError(
                f"micro_batch_size={m}: it must be a positive number of samples per rank "
                "and micro-step; pass micro_batch_size >= 1"
            )
        if w <= 0:
            raise ConfigError(f"world_size={w}: it must be at least 1")
        if g < w:
            raise ConfigError(
                f"global_batch_size={g} is smaller than the world size {w}: every rank needs "
                f"at least one sample per step; use global_batch_size >= {w} or fewer ranks"
            )

    @property
    def accumulation_steps(self) -> int:
        """A = ceil(G / (m*W)): the micro-steps every rank runs per optimizer step."""
        return math.ceil(self.global_batch_size / (self.micro_batch_size * self.world_size))

    def rank_range(self, rank: int) -> tuple[int, int]:
        """Positions [start, stop) of the global batch that `rank` consumes."""
        self._check_rank(rank)
        base, extra = divmod(self.global_batch_size, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def micro_batches(self, rank: int) -> tuple[MicroBatch, ...]:
        """The A micro-batches of `rank`, in order; some may be empty (weight 0)."""
        start, stop = self.rank_range(rank)
        steps = self.accumulation_steps
        base, extra = divmod(stop - start, steps)
        out = []
        for a in range(steps):
            size = base + (1 if a < extra else 0)
            out.append(
                MicroBatch(
                    index=a,
                    start=start,
                    stop=start + size,
                    weight=size * self.world_size / self.global_batch_size,
                )
            )
            start += size
        return tuple(out)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank={rank} is outside [0, {self.world_size})")


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module a torch.compile'd model wraps (DDP, FSDP2 or plain); `model` itself otherwise."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    return model


def is_fsdp2(model: torch.nn.Module) -> bool:
    return isinstance(unwrap_compiled(model), _FSDPModule)


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(unwrap_compiled(model), torch.nn.parallel.DistributedDataParallel)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Turn gradient synchronisation off (enabled=False) for one micro-step.

    DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync(False)`. A plain module has no sync.
    The flag must cover both forward and backward: DDP reads it in forward.
    """
    model = unwrap_compiled(model)
    if enabled:
        yield
    elif is_ddp(model):
        with model.no_sync():
            yield
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
