"""The random streams a training step may draw from, captured and restored for resume.

Streams: torch's CPU generator, torch's CUDA generators (one per device), Python's `random`
and NumPy's legacy global generator. A capture keeps the libraries' own objects;
`to_json()` turns it into plain JSON values for the checkpoint (no pickle), `from_json()`
reads them back. The torch streams can be captured on their own (`TorchStreams`, about a
microsecond), which is what TrainLoop does at every step boundary; reading Python's and
NumPy's states costs tens of microseconds (NumPy copies its 624 words one by one), too
much for every step of a small model.

CUDA is captured only when this process has initialised it: a process that never did has
not drawn from a CUDA generator, and asking for the states would initialise CUDA (a context
on every device). Restoring CUDA states needs CUDA; without it they are skipped with a
warning, since a run resumed on another kind of device cannot be bitwise anyway.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_NUMPY_FIELDS = ("algorithm", "key", "pos", "has_gauss", "cached_gaussian")


@dataclass(frozen=True)
class TorchStreams:
    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]  # one per device; empty when CUDA was not initialised

    @classmethod
    def capture(cls) -> TorchStreams:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(torch.get_rng_state(), cuda)


@dataclass(frozen=True)
class RngState:
    torch_streams: TorchStreams
    python: tuple[Any, ...]  # random.getstate(): (version, internal state, gauss_next)
    numpy: tuple[Any, ...]  # np.random.get_state(): (algorithm, key, pos, has_gauss, gauss)

    @classmethod
    def capture(cls, torch_streams: TorchStreams | None = None) -> RngState:
        """Every stream as it is now, or the torch streams as given (captured earlier)."""
        return cls(torch_streams or TorchStreams.capture(), random.getstate(), np.random.get_state())

    def to_json(self) -> dict[str, Any]:
        version, internal, gauss_next = self.python
        algorithm, key, pos, has_gauss, cached = self.numpy
        return {
            "torch": self.torch_streams.cpu.tolist(),
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": dict(zip(_NUMPY_FIELDS, (algorithm, key.tolist(), int(pos), int(has_gauss), float(cached)))),
            "cuda": [state.tolist() for state in self.torch_streams.cuda],
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RngState:
        python, numpy = value["python"], value["numpy"]
        return cls(
            torch_streams=TorchStreams(
                cpu=torch.tensor(value["torch"], dtype=torch.uint8),
                cuda=tuple(torch.tensor(state, dtype=torch.uint8) for state in value["cuda"]),
            ),
            python=(python["version"], tuple(python["state"]), python["gauss_next"]),
            numpy=(numpy["algorithm"], np.array(numpy["key"], dtype=np.uint32), numpy["pos"],
                   numpy["has_gauss"], numpy["cached_gaussian"]),
        )

    def restore(self, where: str) -> None:
        """Set every stream; `where` names the checkpoint in the warning about CUDA states."""
        torch.set_rng_state(self.torch_streams.cpu)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        cuda = self.torch_streams.cuda
        if not cuda:
            return
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if devices < len(cuda):
            warnings.warn(
                f"{where} holds CUDA RNG states for {len(cuda)} devices, this process has "
                f"{devices}: the CPU, Python and NumPy streams are restored, the CUDA streams of "
                f"devices {devices}..{len(cuda) - 1} are not (resume with as many GPUs "
                "for a bitwise equal run)",
                RuntimeWarning,
                stacklevel=2,
            )
        for device, state in enumerate(cuda[:devices]):
            torch.cuda.set_rng_state(state, device)


def seed_all(seed: int) -> None:
    """Seed every stream (torch.manual_seed seeds the CUDA generators too, lazily)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
