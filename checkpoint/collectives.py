"""The ranks a manager works with: its private gloo group and the small collectives on it.

The manager's collectives run on a gloo group of their own, created when the ranks are
taken (all ranks together), so checkpoint traffic never interleaves with the training
loop's collectives on the default group. Only small JSON metadata travels this way, never
anything read from a file. The group is destroyed when the manager closes or takes its
ranks again.
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
    def current(cls, process_group: dist.ProcessGroup | None = None) -> RankGroup:
        """Rank, world size and round within `process_group` (default: the world) and the environment.

        A collective of the ranks of `process_group` (of the default group when None): it
        creates the private gloo group among them.
        """
        round_ = int_var(os.environ, names.ROUND, None)
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group= was given but torch.distributed is not initialized; "
                                 "call elastic.init() (or init_process_group) first, or drop process_group")
            return cls(0, 1, round_, None)
        if process_group is None:
            return cls(dist.get_rank(), dist.get_world_size(), round_, dist.new_group(backend="gloo"))
        if dist.get_rank(process_group) < 0:
            raise ValueError(f"rank {dist.get_rank()} is not in process_group: only its ranks create "
                             "this CheckpointManager")
        # Only the group's ranks take part, so several groups may each have their own manager.
        group = dist.new_group(dist.get_process_group_ranks(process_group), backend="gloo",
                               use_local_synchronization=True)
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), round_, group)

    def close(self) -> None:
        """Destroy the private group (a local call, not a collective)."""
        if self.group is None:
            return
        try:
            dist.destroy_process_group(self.group)
        except ValueError:
            pass  # destroyed already, with every group, by dist.destroy_process_group() (a rejoin)

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
