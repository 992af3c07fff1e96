"""The ranks a manager works with: its private gloo group and the small collectives on it.

The manager's collectives run on a gloo group of their own, created when the ranks are
taken (all ranks together), so checkpoint traffic never interleaves with the training
loop's collectives on the default group. Only small JSON metadata travels this way, never
anything read from a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from elastic.exchange import env as names
from elastic.exchange.env import int_var


@dataclass(frozen=True)
class RankGroup:
    """This process's rank among `world` ranks, in rendezvous round `round` (None: not under elastic-run)."""

    rank: int
    world: int
    round: int | None
    group: dist.ProcessGroup | None  # the private gloo group; None without a process group

    @classmethod
    def current(cls) -> RankGroup:
        """Rank, world size and round of the current process group and environment.

        A collective in a process group: it creates the private gloo group.
        """
        round_ = int_var(os.environ, names.ROUND, None)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), round_, dist.new_group(backend="gloo"))
        return cls(0, 1, round_, None)

    def all_gather(self, obj: Any) -> list[Any]:
        """Gather small JSON metadata from every rank."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, json.dumps(obj), group=self.group)
        return [json.loads(s) for s in out]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [json.dumps(obj)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return json.loads(box[0])
