"""Shard files: safetensors written from a staging buffer, read back chunk by chunk, verified.

A shard is a standard safetensors file (any safetensors reader opens it). Blocks are laid out
by element size, largest first, so every block is naturally aligned with no holes. While
writing we checksum the header and every block; the manifest records the byte range and
checksum of each block, so a reader can fetch and verify just the blocks it needs.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from checkpoint.io import storage
from checkpoint.errors import CheckpointCorruptError
from checkpoint.format.manifest import ChunkEntry, FileEntry, checksum, safetensors_dtype
from checkpoint.format.plan import WriteItem


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
    loc: storage.Location,
    step: int,
    file_name: str,
    lay: Layout,
    buffer: torch.Tensor,
    staged: Callable[[int], int],
) -> tuple[FileEntry, dict[str, ChunkEntry]]:
    """Checksum and durably write the blocks as they are staged; returns the manifest entries.

    `staged(n)` blocks until at least n blocks are in the buffer and returns how many are.
    """
    header = _header(lay)
    data = memoryview(buffer[: lay.total].numpy()) if lay.total else memoryview(b"")

    def parts() -> Iterator[memoryview | bytes]:
        yield header
        index = 0
        while index < len(lay.items):
            ready = staged(index + 1)  # write every block staged so far in one go
            end = lay.starts[ready - 1] + lay.items[ready - 1].nbytes
            yield data[lay.starts[index] : end]
            index = ready

    def checksums() -> list[str]:
        sums = []
        for index, (item, start) in enumerate(zip(lay.items, lay.starts)):
            staged(index + 1)
            sums.append(checksum(data[start : start + item.nbytes]))
        return sums

    # The header does not depend on the checksums, so hashing (crc32 releases the GIL) runs
    # beside the write instead of before it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as pool:
        sums = pool.submit(checksums)
        storage.write_durably(loc, loc.path(step, file_name), parts())
        crcs = sums.result()
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
        for item, start, crc in zip(lay.items, lay.starts, crcs)
    }
    entry = FileEntry(file_name, len(header) + lay.total, len(header), checksum(header))
    return entry, chunks


class ShardReader:
    """Reads verified chunks of one checkpoint; checks each touched file's size once.

    Local files are opened once (the size check is an fstat of that descriptor) and read with
    positional reads straight into the destination memory, so threads share descriptors and
    no intermediate buffer exists. Close it (or use `with`) to release the descriptors.
    """

    def __init__(self, loc: storage.Location, step: int, sizes: dict[str, int]) -> None:
        self._loc, self._step, self._sizes = loc, step, sizes
        self._checked: dict[str, int | None] = {}  # name -> descriptor (local) or None
        self._lock = threading.Lock()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            fds, self._checked = [fd for fd in self._checked.values() if fd is not None], {}
        for fd in fds:
            os.close(fd)

    def _open(self, name: str) -> int | None:
        """The checked file's descriptor (local) or None (other filesystems)."""
        with self._lock:
            if name in self._checked:
                return self._checked[name]
            where = self._loc.holder(name)
            path = where.path(self._step, name)
            fd = None
            try:
                if where.is_local:
                    fd = os.open(path, os.O_RDONLY)
                    size = os.fstat(fd).st_size
                else:
                    size = storage.file_size(where, path)
            except FileNotFoundError as exc:
                raise CheckpointCorruptError(
                    f"shard file {path} is missing; the manifest lists it with {self._sizes[name]} bytes. "
                    "The checkpoint is incomplete: load an earlier step."
                ) from exc
            if size != self._sizes[name]:
                if fd is not None:
                    os.close(fd)
                raise CheckpointCorruptError(
                    f"shard file {path} has {size} bytes, the manifest says {self._sizes[name]} "
                    "(truncated or overwritten). Load an earlier step."
                )
            self._checked[name] = fd
            return fd

    def read(self, chunk: ChunkEntry, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The verified chunk, read into `out` (contiguous CPU, the chunk's shape) if given."""
        fd = self._open(chunk.file)
        where = self._loc.holder(chunk.file)
        path = where.path(self._step, chunk.file)
        if out is None:
            out = torch.empty(chunk.shape, dtype=dtype)
        raw = memoryview(out.detach().view(-1).view(torch.uint8).numpy() if out.numel() else bytearray())
        nbytes = chunk.end - chunk.begin
        try:
            if fd is not None:
                got = _pread_into(fd, raw, chunk.begin)
            elif hasattr(where.fs, "read_range_into"):  # another node's memory: straight into place
                got = where.fs.read_range_into(path, chunk.begin, raw)
            else:
                data = where.fs.cat_file(path, start=chunk.begin, end=chunk.end)
                got = len(data)
                raw[:got] = data
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(f"shard file {path} disappeared while loading") from exc
        if got != nbytes:
            raise CheckpointCorruptError(
                f"shard file {path}: chunk {chunk.name!r} at bytes {chunk.begin}-{chunk.end} "
                f"returned {got} bytes (truncated)"
            )
        actual = checksum(raw)
        if actual != chunk.checksum:
            raise CheckpointCorruptError(
                f"shard file {path}: chunk {chunk.name!r} (bytes {chunk.begin}-{chunk.end}) has "
                f"checksum {actual}, the manifest says {chunk.checksum}; the file is corrupt. "
                "Load an earlier step."
            )
        return out


def _pread_into(fd: int, raw: memoryview, offset: int) -> int:
    """Fill `raw` from `offset`; returns the bytes read (fewer only at end of file)."""
    got = 0
    while got < len(raw):  # one call moves at most ~2 GiB on Linux
        n = os.preadv(fd, [raw[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def verify_file(
    loc: storage.Location,
    step: int,
    entry: FileEntry,
    chunks: Sequence[tuple[ChunkEntry, torch.dtype]],
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Read every byte of one shard file and check its header and every chunk checksum.

    `on_chunk(nbytes)` is called after each chunk is verified (progress reporting).
    """
    where = loc.holder(entry.path)  # a restore's location may read the files of one step from several places
    path = where.path(step, entry.path)
    covered = entry.header_size + sum(c.end - c.begin for c, _ in chunks)
    if covered != entry.size:
        raise CheckpointCorruptError(
            f"shard file {path}: header and chunks cover {covered} of {entry.size} bytes; "
            "the manifest is inconsistent"
        )
    with ShardReader(loc, step, {entry.path: entry.size}) as reader:
        for chunk, dtype in chunks:
            reader.read(chunk, dtype)
            if on_chunk is not None:
                on_chunk(chunk.end - chunk.begin)
    try:
        with where.fs.open(path, "rb") as f:
            header = f.read(entry.header_size)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(f"shard file {path} disappeared while verifying") from exc
    if checksum(header) != entry.header_checksum:
        raise CheckpointCorruptError(
            f"shard file {path}: header has checksum {checksum(header)}, the manifest says "
            f"{entry.header_checksum}; the file is corrupt"
        )
