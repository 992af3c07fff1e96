"""What happens to the gradients between the last backward of a step and the next step:
loss scaling (torch.amp.GradScaler), the user's hook, clipping, the optimizer and scheduler.

Order, as in Lightning: the scaler unscales the gradients, `on_before_optimizer_step(step)`
sees the final gradients (the exact global mean: DDP's all-reduce, or FSDP2's reduce-scatter,
ran in the last backward), then `clip_grad_norm` clips their global norm
(torch.nn.utils.clip_grad_norm_, which also handles FSDP2's DTensor gradients), then the
optimizer steps through the scaler. A step whose gradients hold inf or NaN is skipped by the
scaler: no optimizer or scheduler step is taken and the loop's step index does not advance,
but the step's samples are consumed (the next step takes the next samples), so a run that
overflows sees each sample once per epoch all the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from elastic.errors import ConfigError

log = logging.getLogger(__name__)


class OptimizerStep:
    """One optimizer step from final gradients: unscale, hook, clip, step, zero, schedule."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 grad_scaler: torch.amp.GradScaler | None, clip_grad_norm: float | None,
                 on_before_optimizer_step: Callable[[Any], None] | None) -> None:
        if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
            raise ConfigError(f"clip_grad_norm={clip_grad_norm}: it must be a finite max norm > 0, or None")
        if on_before_optimizer_step is not None and not callable(on_before_optimizer_step):
            raise ConfigError("on_before_optimizer_step must be a callable taking the Step, or None")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_scaler = grad_scaler
        self.clip_grad_norm = clip_grad_norm
        self.hook = on_before_optimizer_step

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)

    def take(self, step: Any) -> tuple[bool, torch.Tensor | None]:
        """Apply the gradients of `step`; (whether the optimizer stepped, the gradient norm
        before clipping, when clipping is on)."""
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.hook is not None:
            self.hook(step)
        norm = None
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor; one plain type under DDP and FSDP2
                norm = norm.full_tensor()
        taken = True
        if scaler is None:
            self.optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            taken = scaler.get_scale() >= scale  # it backs off (GradScaler: factor < 1) exactly when it skipped
            if not taken:
                log.warning("step %d skipped by the grad scaler (inf/NaN gradients)", step.index)
        self.optimizer.zero_grad(set_to_none=True)
        if taken and self.scheduler is not None:
            self.scheduler.step()
        return taken, norm
