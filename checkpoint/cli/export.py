"""One consolidated safetensors file from a checkpoint (`elastic-ckpt export`), and back.

Export assembles every tensor whole (all chunks of a sharded tensor placed at their global
offsets, every chunk checksum verified) and writes a standard safetensors file that the
plain `safetensors` library loads. Tensor names are the manifest keys ("model/fc.weight").
The file's metadata (strings only, as safetensors requires) keeps what is not a tensor:

    format                      "pt"
    elastic_ckpt.format_version "1"
    elastic_ckpt.step           the step, e.g. "120"
    elastic_ckpt.epoch          the epoch or "null"
    elastic_ckpt.metrics        JSON object of metrics
    elastic_ckpt.state          JSON state skeleton, tensors as {"__tensor__": name}

Import reads such a file (or any safetensors file, whose tensors become top-level state
entries) and saves it as a new committed checkpoint through the CheckpointManager.
The whole state is held in memory once, in both directions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint.format import statedict
from checkpoint.io import shardfile
from checkpoint.cli.catalog import Root
from checkpoint.errors import CheckpointError
from checkpoint.manager import CheckpointManager
from checkpoint.format.manifest import Manifest, torch_dtype

EXPORT_VERSION = "1"
_PREFIX = "elastic_ckpt."


def full_tensors(root: Root, manifest: Manifest, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint named by `keys` (default: every one), whole and verified,
    keyed by their manifest keys."""
    out = {}
    with shardfile.ShardReader(root.loc, manifest.step, {f.path: f.size for f in manifest.files}) as reader:
        for key in manifest.tensors if keys is None else keys:
            entry = manifest.tensors[key]
            dtype = torch_dtype(entry.dtype)
            full = torch.empty(entry.shape, dtype=dtype)
            for chunk in entry.chunks:
                region = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.shape))
                full[region] = reader.read(chunk, dtype)
            out[key] = full
    return out


def export(root: Root, step: int, dest: str, *, overwrite: bool) -> tuple[int, int]:
    """Write checkpoint `step` to the local file `dest`; returns (tensors, bytes of data)."""
    manifest = root.manager.manifest(step)
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest} already exists; pass --force to overwrite it or choose another --to")
    tensors = full_tensors(root, manifest)
    metadata = {
        "format": "pt",
        f"{_PREFIX}format_version": EXPORT_VERSION,
        f"{_PREFIX}step": str(step),
        f"{_PREFIX}epoch": json.dumps(manifest.epoch),
        f"{_PREFIX}metrics": json.dumps(dict(manifest.metrics)),
        f"{_PREFIX}state": json.dumps(manifest.state),
    }
    write_file(tensors, dest, metadata)
    return len(tensors), data_bytes(tensors)


def data_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_file(tensors: dict[str, torch.Tensor], dest: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all (a temporary file renamed onto `dest`)."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, dest)
    except (OSError, SafetensorError) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(
            f"cannot write {dest} ({exc}); check that its directory exists and is writable"
        ) from exc


def _read(src: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(src, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {src} as a safetensors file: {exc}") from exc


def import_file(
    src: str, url: str, step: int, storage_options: dict[str, Any] | None = None
) -> int:
    """Save the safetensors file `src` as checkpoint `step` of `url`; returns the tensor count."""
    tensors, metadata = _read(src)
    if f"{_PREFIX}state" in metadata:
        skeleton = json.loads(metadata[f"{_PREFIX}state"])
        metrics = json.loads(metadata.get(f"{_PREFIX}metrics", "{}"))
        epoch = json.loads(metadata.get(f"{_PREFIX}epoch", "null"))
    else:
        skeleton = {key: {statedict.TENSOR_TAG: key} for key in tensors}
        metrics, epoch = {}, None
    state = {name: statedict.unflatten(value, tensors) for name, value in skeleton.items()}
    with CheckpointManager(url, async_write=False, storage_options=storage_options) as ckpt:
        if step in ckpt.steps():
            raise CheckpointError(
                f"step {step} is already committed in {url}; choose another --step or prune it first"
            )
        ckpt.save(step, state, metrics, epoch=epoch)
    return len(tensors)
