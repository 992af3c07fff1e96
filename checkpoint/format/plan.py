"""What each rank writes, and what each rank must read: pure functions of tensor metadata.

Save side: a plain tensor in a process group is replicated (DDP), so the replicated state is
split by bytes across ranks and every rank writes a disjoint part: tensors bigger than a
piece target are cut into row blocks along dim 0, then pieces go largest-first to the least
loaded rank. Every rank computes the same plan from the same metadata, so no communication
is needed. A DTensor (FSDP2) contributes its local shard with its global offsets; for mesh
dimensions where it is replicated only coordinate 0 writes. A rank's own (per-rank) tensors
are written whole by that rank.

Load side: a rank needs, for each tensor, the region it holds (the whole tensor for a plain
tensor, the local shard for a DTensor) and reads exactly the chunks that intersect it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from checkpoint.format.manifest import ChunkEntry

# Below this a tensor is never cut: tiny pieces cost more in headers and requests than they save.
MIN_PIECE_BYTES = 1 << 20


@dataclass(frozen=True, eq=False)
class WriteItem:
    """One contiguous block of one tensor that this rank writes."""

    key: str
    dtype: torch.dtype
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    source: torch.Tensor  # the live block to snapshot (a view, never a copy)

    @property
    def name(self) -> str:
        """The safetensors key: the tensor key, plus the offsets when it is a block."""
        if self.shape == self.global_shape:
            return self.key
        return f"{self.key}@{','.join(map(str, self.offsets))}"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]


def meta_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def local_region(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of the part of the global tensor this rank holds."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for p in t.placements:
            if not isinstance(p, (Shard, Replicate)):
                raise TypeError(
                    f"DTensor placement {p} cannot be checkpointed; only Shard and Replicate "
                    "hold complete values (reduce Partial tensors first)"
                )
        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(offsets), tuple(shape)
    return (0,) * t.dim(), tuple(t.shape)


def _writes_replica(t: DTensor) -> bool:
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return False
    return all(c == 0 for c, p in zip(coord, t.placements) if isinstance(p, Replicate))


def _whole(key: str, t: torch.Tensor) -> WriteItem:
    shape = tuple(t.shape)
    return WriteItem(key, t.dtype, shape, (0,) * t.dim(), shape, t)


def _row_blocks(key: str, t: torch.Tensor, target: float) -> list[WriteItem]:
    shape = tuple(t.shape)
    nbytes = t.numel() * t.element_size()
    if t.dim() == 0 or nbytes <= target or shape[0] < 2:
        return [_whole(key, t)]
    count = min(shape[0], math.ceil(nbytes / target))
    bounds = [shape[0] * i // count for i in range(count + 1)]
    return [
        WriteItem(key, t.dtype, shape, (a,) + (0,) * (t.dim() - 1), (b - a,) + shape[1:], t[a:b])
        for a, b in zip(bounds, bounds[1:])
        if b > a
    ]


def plan_writes(
    tensors: Mapping[str, torch.Tensor], rank: int, world_size: int, own: Set[str] = frozenset()
) -> list[WriteItem]:
    """The blocks `rank` writes. Deterministic: every rank derives the same global plan.

    `own` are keys of this rank's own tensors (no other rank has them): written whole.
    """
    mine: list[WriteItem] = []
    replicated: list[tuple[str, torch.Tensor]] = []
    for key in sorted(tensors):
        t = tensors[key]
        if key in own:
            mine.append(_whole(key, t))
        elif isinstance(t, DTensor):
            offsets, shape = local_region(t)
            if math.prod(shape) and _writes_replica(t):
                mine.append(WriteItem(key, t.dtype, tuple(t.shape), offsets, shape, t.to_local()))
        else:
            replicated.append((key, t))
    if world_size == 1:
        return mine + [_whole(k, t) for k, t in replicated]
    total = sum(t.numel() * t.element_size() for _, t in replicated)
    # A quarter of a rank's fair share bounds the imbalance of the greedy split to ~25%.
    target = max(total / world_size / 4, MIN_PIECE_BYTES)
    pieces = [p for k, t in replicated for p in _row_blocks(k, t, target)]
    pieces.sort(key=lambda p: (-p.nbytes, p.key, p.offsets))
    loads = [(0, r) for r in range(world_size)]
    for piece in pieces:
        load, owner = heapq.heappop(loads)
        if owner == rank:
            mine.append(piece)
        heapq.heappush(loads, (load + piece.nbytes, owner))
    return mine


@dataclass(frozen=True)
class ReadItem:
    """Copy chunk[src] into destination[dst]."""

    chunk: ChunkEntry
    src: tuple[slice, ...]
    dst: tuple[slice, ...]


def plan_reads(chunks: Sequence[ChunkEntry], offsets: Sequence[int], shape: Sequence[int]) -> list[ReadItem]:
    """The chunks that intersect the region [offsets, offsets+shape), with both-side slices."""
    if math.prod(shape) == 0:
        return []
    reads = []
    for c in chunks:
        lo = [max(a, b) for a, b in zip(c.offsets, offsets)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(c.offsets, c.shape, offsets, shape)]
        if math.prod(c.shape) == 0 or any(h <= l for l, h in zip(lo, hi)):
            continue
        src = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, c.offsets))
        dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))
        reads.append(ReadItem(c, src, dst))
    return reads
