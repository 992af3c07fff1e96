"""When the loop saves at a step boundary: durably every `save_every` steps, into the checkpoint
manager's memory tier every `memory_save_every` steps that are not durable saves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elastic.errors import ConfigError


@dataclass(frozen=True)
class SaveCadence:
    save_every: int | None = None
    memory_save_every: int | None = None

    @classmethod
    def checked(cls, checkpoint: Any, save_every: int | None, memory_save_every: int | None) -> SaveCadence:
        """The cadence, once the options make sense together with `checkpoint` (a manager or None)."""
        for name, every in (("save_every", save_every), ("memory_save_every", memory_save_every)):
            if every is not None and every <= 0:
                raise ConfigError(f"{name}={every}: it must be >= 1, or None for no periodic saves")
        if save_every is not None and checkpoint is None:
            raise ConfigError(f"save_every={save_every} needs a checkpoint manager: pass checkpoint=...")
        if memory_save_every is not None and not getattr(checkpoint, "memory_tier", False):
            raise ConfigError(f"memory_save_every={memory_save_every} saves into the checkpoint manager's memory "
                              "tier: pass checkpoint=CheckpointManager(..., memory_tier=True)")
        return cls(save_every, memory_save_every)

    def due(self, completed: int) -> bool | None:
        """After `completed` optimizer steps: True for a durable save, False for a memory-only
        save, None for no save."""
        if self.save_every is not None and completed % self.save_every == 0:
            return True
        if self.memory_save_every is not None and completed % self.memory_save_every == 0:
            return False
        return None
