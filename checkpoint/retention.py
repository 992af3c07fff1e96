"""Which committed checkpoints to keep: a pure decision, shared by the manager and the CLI.

Input: the committed checkpoints as read from their manifests (never in-memory history, so
restarts and copied directories behave). Output: one keep flag per checkpoint. The caller
deletes; nothing here touches storage.

Rules, in order:
- a damaged checkpoint (marked by the caller: files missing or of the wrong size, or found
  corrupt while loading) is never counted, never best and never deleted: it cannot be a
  resume point, and it is left for `elastic-ckpt inspect/verify` to show;
- the newest undamaged checkpoint is always kept (it is the resume point);
- the `keep_last` newest undamaged ones are kept;
- the `keep_best` best by `metric` are kept: ascending for mode "min", descending for
  "max"; a missing or NaN metric is never best; equal values prefer the newer step;
- with neither `keep_last` nor `keep_best` set, everything is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    metrics: Mapping[str, float]
    damaged: bool = False


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(
                f"keep_last={self.keep_last} must be at least 1 (the newest checkpoint is the "
                "resume point) or None to keep every checkpoint"
            )
        if self.keep_best is not None and self.keep_best < 0:
            raise ValueError(f"keep_best={self.keep_best} must be >= 0 or None")
        if self.keep_best and not self.metric:
            raise ValueError(f"keep_best={self.keep_best} needs metric=<name of a saved metric>")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode={self.mode!r} must be 'min' or 'max'")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_best is None


def rank_best(infos: Sequence[CheckpointInfo], metric: str, mode: str) -> list[int]:
    """Undamaged steps with a non-NaN `metric`, best first; ties prefer newer steps."""
    scored = [
        (i.metrics[metric], i.step)
        for i in infos
        if not i.damaged and metric in i.metrics and not math.isnan(i.metrics[metric])
    ]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))
    return [step for _, step in scored]


def decide(infos: Sequence[CheckpointInfo], policy: RetentionPolicy) -> list[bool]:
    """One keep flag per entry of `infos` (any order; steps must be unique)."""
    if not infos:
        return []
    if policy.keeps_everything:
        return [True] * len(infos)
    newest_first = sorted((i.step for i in infos if not i.damaged), reverse=True)
    keep = set(newest_first[: policy.keep_last or 1])
    if policy.keep_best and policy.metric:
        keep.update(rank_best(infos, policy.metric, policy.mode)[: policy.keep_best])
    return [i.damaged or i.step in keep for i in infos]
