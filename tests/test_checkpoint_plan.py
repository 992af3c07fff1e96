"""The pure planning functions: byte-balanced disjoint writes, minimal reads; host memory."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.format.manifest import ChunkEntry
from checkpoint.format.plan import MIN_PIECE_BYTES, plan_reads, plan_writes


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
    world=st.integers(1, 5),
)
def test_replicated_state_is_split_disjointly_and_balanced(rows, world):
    tensors = {f"t{i}": torch.empty(r, 256, dtype=torch.float32) for i, r in enumerate(rows)}
    plans = [plan_writes(tensors, rank, world) for rank in range(world)]
    covered = {k: 0 for k in tensors}
    for items in plans:
        for item in items:
            covered[item.key] += math.prod(item.shape)
            assert item.source.shape == torch.Size(item.shape)
    assert covered == {k: t.numel() for k, t in tensors.items()}, "every element written exactly once"
    loads = [sum(i.nbytes for i in items) for items in plans]
    total = sum(loads)
    biggest_piece = max(i.nbytes for items in plans for i in items)
    assert max(loads) <= total / world + max(biggest_piece, 0), loads
    if world > 1:
        assert biggest_piece <= max(total / world / 4, MIN_PIECE_BYTES) + 256 * 4, "big tensors are cut"


def chunk(offsets, shape, name="c"):
    return ChunkEntry("f", name, tuple(offsets), tuple(shape), 0, 4 * math.prod(shape), "crc32:0")


def test_reads_only_intersecting_chunks():
    chunks = [chunk((0, 0), (4, 3), "a"), chunk((4, 0), (4, 3), "b"), chunk((8, 0), (2, 3), "c")]
    reads = plan_reads(chunks, (3, 0), (2, 3))
    assert [r.chunk.name for r in reads] == ["a", "b"]
    assert reads[0].src == (slice(3, 4), slice(0, 3)) and reads[0].dst == (slice(0, 1), slice(0, 3))
    assert reads[1].src == (slice(0, 1), slice(0, 3)) and reads[1].dst == (slice(1, 2), slice(0, 3))
    assert plan_reads(chunks, (0, 0), (0, 3)) == []  # an empty local shard reads nothing
    assert [r.chunk.name for r in plan_reads(chunks, (0, 0), (10, 3))] == ["a", "b", "c"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_host_memory_steady_across_saves(tmp_path):
    from checkpoint import CheckpointManager

    state = {"w": torch.randn(4 << 20)}  # 16 MiB
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        for step in range(3):
            ckpt.save(step, state)
        ckpt.wait()
        before = _rss()
        for step in range(3, 20):
            state["w"].add_(1)
            ckpt.save(step, state)
        ckpt.wait()
        after = _rss()
    # A leaked staging copy per save would add 17 x 16 MiB; allow less than one.
    assert after - before < 16 << 20, f"RSS grew by {(after - before) >> 20} MiB over 17 saves"
