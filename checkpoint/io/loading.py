"""Loading: does a checkpoint fit the state (preflight), and reading what this rank needs.

`check_fit` compares the manifest with the tensors of the state being loaded and names every
missing or unexpected key and every shape or dtype mismatch. `read_state` reads, for every
tensor, only the chunks that intersect the region this rank holds, verifies each chunk's
checksum, and rebuilds the saved tree (DTensors for DTensor targets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from checkpoint.format import plan, statedict
from checkpoint.io import shardfile, storage
from checkpoint.errors import CheckpointMismatchError
from checkpoint.format.manifest import Manifest, TensorEntry, dtype_name, torch_dtype

_READ_WORKERS = 2


def tensor_keys(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if set(skeleton) == {statedict.TENSOR_TAG}:
            return {skeleton[statedict.TENSOR_TAG]}
        return set().union(*(tensor_keys(v) for v in skeleton.values())) if skeleton else set()
    if isinstance(skeleton, list):
        return set().union(*(tensor_keys(v) for v in skeleton)) if skeleton else set()
    return set()


def rank_view(manifest: Manifest, state: Mapping[str, Any], rank: int, world_size: int) -> tuple[Manifest, dict[str, Any]]:
    """The manifest and the state entries to load as rank `rank` of `world_size` sees them.

    A PerRank entry becomes this rank's own saved skeleton, or is left out (kept as it is)
    when the world size changed and it says on_resize="keep". Raises
    CheckpointMismatchError when per-rank state cannot go back to its ranks, or when an
    entry is per rank on one side only.
    """
    own_state, entries, problems = dict(manifest.state), {}, []
    for name, obj in state.items():
        saved = manifest.state.get(name)
        saved_per_rank = isinstance(saved, dict) and set(saved) == {statedict.PER_RANK_TAG}
        if not isinstance(obj, statedict.PerRank):
            if saved_per_rank:
                problems.append(f"{name!r} was saved per rank; wrap it as PerRank(...) to load it")
            entries[name] = obj
        elif name not in manifest.state:
            entries[name] = obj.value  # check_fit names it as missing
        elif not saved_per_rank:
            problems.append(f"{name!r} was saved as state shared by all ranks; pass it without PerRank")
        elif manifest.world_size != world_size:
            if obj.on_resize == "error":
                problems.append(
                    f"{name!r} was saved per rank by {manifest.world_size} ranks and this job has "
                    f"{world_size}, so ranks cannot get their own values back; load at world size "
                    f"{manifest.world_size}, or pass PerRank(..., on_resize='keep') to keep the current "
                    "values when the world size changes"
                )
        else:
            own_state[name] = saved[statedict.PER_RANK_TAG][str(rank)]
            entries[name] = obj.value
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint step {manifest.step} does not fit the state being loaded: " + "; ".join(problems)
        )
    return dataclasses.replace(manifest, state=own_state), entries


def check_fit(manifest: Manifest, state: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointMismatchError naming every key, shape and dtype that does not fit.

    Names of `state` must all be in the checkpoint; names only in the checkpoint are ignored
    (loading a subset, e.g. just the model, is allowed).
    """
    problems = []
    missing_names = [n for n in state if n not in manifest.state]
    if missing_names:
        problems.append(f"state names not in the checkpoint: {missing_names}")
    saved = set().union(*(tensor_keys(manifest.state[n]) for n in state if n in manifest.state)) if state else set()
    wanted = {k for k in targets if k.split("/", 1)[0] in {statedict.escape(n) for n in state if n in manifest.state}}
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {unexpected[:20]}")
    for key in sorted(wanted & saved):
        entry, t = manifest.tensors[key], targets[key]
        if tuple(t.shape) != entry.shape or dtype_name(t.dtype) != entry.dtype:
            problems.append(
                f"{key}: checkpoint has {entry.dtype}{list(entry.shape)}, the model has "
                f"{dtype_name(t.dtype)}{list(t.shape)}"
            )
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint step {manifest.step} does not fit the state being loaded: " + "; ".join(problems)
            + ". Build the model and optimizer as they were when saving, or pass only the names that fit."
        )


def _direct_target(target: torch.Tensor, entry: TensorEntry, read: plan.ReadItem) -> torch.Tensor | None:
    """The live tensor itself when one chunk fills it exactly, so the chunk is read in place.

    Applying the state afterwards is then a copy of a tensor onto itself, which torch skips:
    no second buffer, no second pass over memory. If the checkpoint turns out to be corrupt,
    the fallback checkpoint overwrites every tensor again.
    """
    if (
        isinstance(target, DTensor)
        or target.device.type != "cpu"
        or not target.is_contiguous()
        or dtype_name(target.dtype) != entry.dtype
        or read.chunk.shape != tuple(target.shape)
    ):
        return None
    return target


def read_state(
    loc: storage.Location, manifest: Manifest, state: Mapping[str, Any], targets: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    keys = sorted(set().union(*(tensor_keys(manifest.state[n]) for n in state)) if state else set())
    plans = {}
    for key in keys:
        offsets, shape = plan.local_region(targets[key])
        plans[key] = (offsets, shape, plan.plan_reads(manifest.tensors[key].chunks, offsets, shape))
    jobs = [(key, r, _direct_target(targets[key], manifest.tensors[key], r)) for key in keys for r in plans[key][2]]
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][1].chunk.file, jobs[i][1].chunk.begin))
    chunks: list[torch.Tensor | None] = [None] * len(jobs)

    def read(i: int) -> None:
        key, r, out = jobs[i]
        chunks[i] = reader.read(r.chunk, torch_dtype(manifest.tensors[key].dtype), out)

    # Reading and checksumming both release the GIL, so the workers copy and hash in
    # parallel; chunks are taken in file order, which keeps reads from disk sequential.
    with shardfile.ShardReader(loc, manifest.step, {f.path: f.size for f in manifest.files}) as reader, \
            ThreadPoolExecutor(max_workers=_READ_WORKERS, thread_name_prefix="checkpoint-read") as pool:
        list(pool.map(read, order))  # re-raises the first error
    by_key: dict[str, list[tuple[plan.ReadItem, torch.Tensor]]] = {k: [] for k in keys}
    for (key, r, _), data in zip(jobs, chunks):
        by_key[key].append((r, data))
    loaded: dict[str, torch.Tensor] = {}
    for key in keys:
        offsets, shape, reads = plans[key]
        target = targets[key]
        parts = by_key[key]
        if len(parts) == 1 and parts[0][0].chunk.shape == shape and parts[0][0].chunk.offsets == offsets:
            region = parts[0][1]
        else:
            region = torch.empty(shape, dtype=torch_dtype(manifest.tensors[key].dtype))
            for r, data in parts:
                region[r.dst].copy_(data[r.src])
        if isinstance(target, DTensor):
            region = DTensor.from_local(
                region, target.device_mesh, target.placements, run_check=False,
                shape=target.shape, stride=target.stride(),
            )
        loaded[key] = region
    return {n: statedict.unflatten(manifest.state[n], loaded) for n in state}
