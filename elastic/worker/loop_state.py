"""What the loop checkpoints: the entries (model, optimizer, scheduler, the user's extra_state
and the loop's own "loop" entry), the "loop" entry itself (the step position, what fixes the
sample order, every rank's random streams, all JSON values) with the checks it passes on
resume, and the part of the CheckpointManager the loop calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from elastic.errors import ConfigError, StateMismatchError
from elastic.worker.rng_state import RngState, seed_all

RESERVED = ("model", "optimizer", "loop", "scheduler", "grad_scaler")  # the loop's own checkpoint entries


class Checkpointer(Protocol):
    """The part of checkpoint.CheckpointManager the loop uses."""

    def save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
        *, epoch: int | None = None, overlap: bool = False, durable: bool = True,
    ) -> None: ...
    def wait_snapshot(self) -> None: ...
    def wait(self) -> None: ...
    def load(self, state: Mapping[str, Any], step: int | None = None) -> int | None: ...
    def regroup(self) -> None: ...
    def set_commit_guard(self, guard: Callable[[], None]) -> None: ...
    def set_commit_listener(self, listener: Callable[[int, float, str], None]) -> None: ...


@dataclass(frozen=True)
class SampleOrder:
    """What fixes which samples each step sees: a resume must find the same values."""

    global_batch_size: int
    dataset_size: int
    seed: int


class LoopState:
    """Step position, sampler identity and every rank's RNG streams, all JSON values."""

    def __init__(self, order: SampleOrder) -> None:
        self.order = order
        self.values: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = dict(state)

    def capture(self, step: int, skipped: int, epoch: int, step_in_epoch: int, streams: RngState,
                group: dist.ProcessGroup | None, world_size: int) -> None:
        """Set the values to save with step `step`, gathering every rank's `streams` over the
        loop's `group` (a collective; None at world size 1). `skipped` steps (the grad scaler's)
        consumed samples too: (epoch, step_in_epoch) is the position of step + skipped."""
        self.values = {
            "step": step,
            "skipped": skipped,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            **dataclasses.asdict(self.order),
            "world_size": world_size,
            "rng": _gather(streams.to_json(), group, world_size),
        }

    def restore(self, step: int, rank: int) -> int:
        """Check the values loaded with the checkpoint of `step` against this loop, restore
        `rank`'s random streams, and return the number of skipped steps before `step`."""
        saved = self.values
        expected = dataclasses.asdict(self.order)
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
        if rank < len(rng):
            RngState.from_json(rng[rank]).restore(f"the checkpoint of step {step}")
        else:
            # A rank that did not exist when the checkpoint was written gets a fresh,
            # deterministic stream rather than a copy of another rank's.
            seed_all(self.order.seed + 1_000_003 * rank + step)
        return saved.get("skipped", 0)  # absent in checkpoints of releases before the grad scaler


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState, scheduler: Any,
                     grad_scaler: Any, extra_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The entries of the loop's checkpoints: its own (RESERVED) and the user's `extra_state`."""
    state: dict[str, Any] = {
        # The manager keys optimizer state by parameter names through the model and drops
        # DDP's "module." prefix; a checkpoint from another model fails its key check
        # (checkpoint.CheckpointMismatchError, naming the keys) before anything is loaded.
        "model": model,
        "optimizer": optimizer,
        "loop": loop,
    }
    if scheduler is not None:
        state["scheduler"] = scheduler
    if grad_scaler is not None:  # its scale and growth tracker: a resume must not restart them
        state["grad_scaler"] = grad_scaler
    for key, value in (extra_state or {}).items():
        if key in state:
            raise ConfigError(f"extra_state key {key!r} is reserved by the loop; rename it")
        state[key] = value
    return state


def _gather(local: Any, group: dist.ProcessGroup | None, world_size: int) -> list[Any]:
    if group is None:
        return [local]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, local, group=group)
    return gathered
