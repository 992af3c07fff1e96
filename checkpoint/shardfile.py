"""Shard files: safetensors written from a staging buffer, read back chunk by chunk, verified.

A shard is a standard safetensors file (any safetensors reader opens it). Blocks are laid out
by element size, largest first, so every block is naturally aligned with no holes. While
writing we checksum the header and every block; the manifest records the byte range and
checksum of each block, so a reader can fetch and verify just the blocks it needs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy
import torch

from checkpoint import storage
from checkpoint.errors import CheckpointCorruptError
from checkpoint.manifest import ChunkEntry, FileEntry, checksum, safetensors_dtype
from checkpoint.plan import WriteItem


@dataclass(frozen=True)
class Layout:
    """Where each block sits in the staging buffer (and in the file's data section)."""

    items: tuple[WriteItem, ...]
    starts: tuple[int, ...]
    total: int


def layout(items: Sequence[WriteItem]) -> Layout:
    ordered = sorted(items, key=lambda i: (-i.dtype.itemsize, i.key, i.offsets))
    starts, pos = [], 0
    for item in ordered:
        starts.append(pos)
        pos += item.nbytes
    return Layout(tuple(ordered), tuple(starts), pos)


def staged_view(buffer: torch.Tensor, item: WriteItem, start: int) -> torch.Tensor:
    """The block's place in the uint8 staging buffer, typed and shaped like the block."""
    return buffer[start : start + item.nbytes].view(item.dtype).view(item.shape)


def _header(lay: Layout) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for item, start in zip(lay.items, lay.starts):
        entries[item.name] = {
            "dtype": safetensors_dtype(item.dtype),
            "shape": list(item.shape),
            "data_offsets": [start, start + item.nbytes],
        }
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body


def write_shard(
    loc: storage.Location, step: int, file_name: str, lay: Layout, buffer: torch.Tensor
) -> tuple[FileEntry, dict[str, ChunkEntry]]:
    """Checksum and durably write the staged blocks; returns the manifest entries."""
    header = _header(lay)
    data = memoryview(buffer[: lay.total].numpy()) if lay.total else memoryview(b"")
    # The header does not depend on the checksums, so hashing (crc32 releases the GIL) runs
    # beside the write instead of before it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as pool:
        sums = pool.submit(lambda: [checksum(data[s : s + i.nbytes]) for i, s in zip(lay.items, lay.starts)])
        storage.write_durably(loc, loc.path(step, file_name), [header, data])
        checksums = sums.result()
    chunks = {
        item.name: ChunkEntry(
            file=file_name,
            name=item.name,
            offsets=item.offsets,
            shape=item.shape,
            begin=len(header) + start,
            end=len(header) + start + item.nbytes,
            checksum=crc,
        )
        for item, start, crc in zip(lay.items, lay.starts, checksums)
    }
    entry = FileEntry(file_name, len(header) + lay.total, len(header), checksum(header))
    return entry, chunks


class ShardReader:
    """Reads verified chunks of one checkpoint; checks each touched file's size once."""

    def __init__(self, loc: storage.Location, step: int, sizes: dict[str, int]) -> None:
        self._loc, self._step, self._sizes = loc, step, sizes
        self._checked: set[str] = set()

    def _check_file(self, name: str) -> None:
        if name in self._checked:
            return
        path = self._loc.path(self._step, name)
        try:
            size = storage.file_size(self._loc, path)
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(
                f"shard file {path} is missing; the manifest lists it with {self._sizes[name]} bytes. "
                "The checkpoint is incomplete: load an earlier step."
            ) from exc
        if size != self._sizes[name]:
            raise CheckpointCorruptError(
                f"shard file {path} has {size} bytes, the manifest says {self._sizes[name]} "
                "(truncated or overwritten). Load an earlier step."
            )
        self._checked.add(name)

    def read(self, chunk: ChunkEntry, dtype: torch.dtype) -> torch.Tensor:
        self._check_file(chunk.file)
        path = self._loc.path(self._step, chunk.file)
        out = torch.empty(chunk.shape, dtype=dtype)
        raw = out.view(-1).view(torch.uint8).numpy() if out.numel() else memoryview(bytearray())
        nbytes = chunk.end - chunk.begin
        try:
            if self._loc.is_local:
                with open(path, "rb") as f:
                    f.seek(chunk.begin)
                    got = f.readinto(raw)
            else:
                data = self._loc.fs.cat_file(path, start=chunk.begin, end=chunk.end)
                got = len(data)
                raw[:got] = numpy.frombuffer(data, dtype=numpy.uint8)
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(f"shard file {path} disappeared while loading") from exc
        if got != nbytes:
            raise CheckpointCorruptError(
                f"shard file {path}: chunk {chunk.name!r} at bytes {chunk.begin}-{chunk.end} "
                f"returned {got} bytes (truncated)"
            )
        actual = checksum(memoryview(raw))
        if actual != chunk.checksum:
            raise CheckpointCorruptError(
                f"shard file {path}: chunk {chunk.name!r} (bytes {chunk.begin}-{chunk.end}) has "
                f"checksum {actual}, the manifest says {chunk.checksum}; the file is corrupt. "
                "Load an earlier step."
            )
        return out


def verify_file(
    loc: storage.Location, step: int, entry: FileEntry, chunks: Sequence[tuple[ChunkEntry, torch.dtype]]
) -> None:
    """Read every byte of one shard file and check its header and every chunk checksum."""
    reader = ShardReader(loc, step, {entry.path: entry.size})
    path = loc.path(step, entry.path)
    covered = entry.header_size + sum(c.end - c.begin for c, _ in chunks)
    if covered != entry.size:
        raise CheckpointCorruptError(
            f"shard file {path}: header and chunks cover {covered} of {entry.size} bytes; "
            "the manifest is inconsistent"
        )
    for chunk, dtype in chunks:
        reader.read(chunk, dtype)
    try:
        with loc.fs.open(path, "rb") as f:
            header = f.read(entry.header_size)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(f"shard file {path} disappeared while verifying") from exc
    if checksum(header) != entry.header_checksum:
        raise CheckpointCorruptError(
            f"shard file {path}: header has checksum {checksum(header)}, the manifest says "
            f"{entry.header_checksum}; the file is corrupt"
        )
