"""The versioned JSON manifest: the one source of truth for the on-disk format.

A checkpoint is a directory per step holding safetensors shard files and `manifest.json`.
The manifest is written last; its appearance is the commit. It records, for every file, the
size and a checksum of its header, and for every tensor chunk the byte range inside its file
and a checksum of those bytes, so every byte of every shard is covered by exactly one
checksum. Sharded tensors list each chunk with its offsets in the global tensor.

Metric values may be NaN or infinite; they are written as the literals NaN / Infinity, as
Python's json module does (strict JSON parsers need allow-NaN mode).

Parsing validates everything once, at the boundary: an unknown `format_version`, a path that
is not a bare file name (so nothing can escape the step directory), a byte range outside its
file or a set of chunks that does not cover its tensor all raise CheckpointCorruptError.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from checkpoint.errors import CheckpointCorruptError
from checkpoint.format.statedict import PER_RANK_TAG

try:  # the same CRC-32 as zlib's, ~8x faster (carry-less multiply); both release the GIL
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # no wheel for this platform: zlib's own, a few GB/s
    _crc32 = zlib.crc32

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_PREFIX = "crc32:"

# Bare file names only: no separators, no "..", nothing a filesystem could resolve elsewhere.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")

# torch dtype <-> (manifest name, safetensors name). Only dtypes safetensors can hold.
_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float64: ("float64", "F64"),
    torch.float32: ("float32", "F32"),
    torch.float16: ("float16", "F16"),
    torch.bfloat16: ("bfloat16", "BF16"),
    torch.int64: ("int64", "I64"),
    torch.int32: ("int32", "I32"),
    torch.int16: ("int16", "I16"),
    torch.int8: ("int8", "I8"),
    torch.uint8: ("uint8", "U8"),
    torch.bool: ("bool", "BOOL"),
    torch.float8_e4m3fn: ("float8_e4m3fn", "F8_E4M3"),
    torch.float8_e5m2: ("float8_e5m2", "F8_E5M2"),
}
_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise TypeError(
            f"tensor dtype {dtype} cannot be stored in safetensors; "
            f"supported: {sorted(_BY_NAME)}. Convert it before saving."
        )
    return _DTYPES[dtype][0]


def safetensors_dtype(dtype: torch.dtype) -> str:
    dtype_name(dtype)
    return _DTYPES[dtype][1]


def torch_dtype(name: str) -> torch.dtype:
    return _BY_NAME[name]


def checksum(data: memoryview | bytes | bytearray) -> str:
    # An integrity check against media and transfer faults, not a signature. Loading hashes
    # every byte it reads, so this speed bounds load speed (zlib-ng: ~30 GB/s, zlib: ~3.5).
    return f"{CHECKSUM_PREFIX}{_crc32(data):08x}"


def is_safe_name(name: str) -> bool:
    return bool(_SAFE_NAME.match(name)) and name not in (".", "..")


@dataclass(frozen=True)
class FileEntry:
    """One shard file: its bare name, size in bytes, and checksum of its header bytes."""

    path: str
    size: int
    header_size: int
    header_checksum: str


@dataclass(frozen=True)
class ChunkEntry:
    """A contiguous block of a tensor stored in one file at bytes [begin, end)."""

    file: str
    name: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    begin: int
    end: int
    checksum: str


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...]


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    tensors: Mapping[str, TensorEntry]
    # The saved state with every tensor replaced by {"__tensor__": key}; see checkpoint.format.statedict.
    state: Any
    metrics: Mapping[str, float] = field(default_factory=dict)
    epoch: int | None = None
    run_id: str | None = None
    round: int | None = None
    created: float = 0.0
    format_version: int = FORMAT_VERSION

    def listing_problems(self, sizes: Mapping[str, int]) -> list[str]:
        """What a listing of the step directory (file name -> size) shows wrong; empty if whole.

        A cheap check (no byte is read): it catches missing and truncated shards, not flipped bytes.
        """
        return [
            f"shard file {f.path} is missing" if f.path not in sizes
            else f"shard file {f.path} has {sizes[f.path]} bytes, the manifest says {f.size}"
            for f in self.files
            if sizes.get(f.path) != f.size
        ]

    def chunks_by_file(self) -> dict[str, list[tuple[ChunkEntry, torch.dtype]]]:
        """Every chunk with its tensor's dtype, grouped by the shard file that holds it."""
        per_file: dict[str, list[tuple[ChunkEntry, torch.dtype]]] = {f.path: [] for f in self.files}
        for entry in self.tensors.values():
            for chunk in entry.chunks:
                per_file[chunk.file].append((chunk, torch_dtype(entry.dtype)))
        return per_file

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes, *, where: str) -> Manifest:
        """Parse and validate; `where` names the manifest in every error message."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointCorruptError(f"{where}: manifest is not valid JSON ({exc})") from exc
        try:
            return _parse(raw, where)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(
                f"{where}: manifest does not follow format_version {FORMAT_VERSION} ({exc!r})"
            ) from exc


def _parse(raw: dict[str, Any], where: str) -> Manifest:
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{where}: format_version {version!r} is not supported; this reader understands "
            f"{FORMAT_VERSION}. Load it with the version of the package that wrote it."
        )
    files = tuple(
        FileEntry(str(f["path"]), int(f["size"]), int(f["header_size"]), str(f["header_checksum"]))
        for f in raw["files"]
    )
    sizes: dict[str, int] = {}
    for f in files:
        if not is_safe_name(f.path):
            raise CheckpointCorruptError(
                f"{where}: file path {f.path!r} is not a bare file name; manifest paths must "
                "stay inside the step directory. Refusing to read this checkpoint."
            )
        sizes[f.path] = f.size
    tensors: dict[str, TensorEntry] = {}
    for key, t in raw["tensors"].items():
        shape = tuple(int(d) for d in t["shape"])
        dtype = str(t["dtype"])
        if dtype not in _BY_NAME:
            raise CheckpointCorruptError(f"{where}: tensor {key!r} has unknown dtype {dtype!r}")
        itemsize = torch.empty((), dtype=_BY_NAME[dtype]).element_size()
        chunks = tuple(
            ChunkEntry(
                str(c["file"]), str(c["name"]), tuple(int(o) for o in c["offsets"]),
                tuple(int(d) for d in c["shape"]), int(c["begin"]), int(c["end"]), str(c["checksum"]),
            )
            for c in t["chunks"]
        )
        covered = 0
        for c in chunks:
            if c.file not in sizes:
                raise CheckpointCorruptError(
                    f"{where}: tensor {key!r} points to {c.file!r}, which is not in the file list"
                )
            nbytes = math.prod(c.shape) * itemsize
            fits = len(c.offsets) == len(shape) == len(c.shape) and all(
                0 <= o and o + n <= d for o, n, d in zip(c.offsets, c.shape, shape)
            )
            if not fits or c.end - c.begin != nbytes or c.begin < 0 or c.end > sizes[c.file]:
                raise CheckpointCorruptError(
                    f"{where}: chunk {c.name!r} of tensor {key!r} (offsets {c.offsets}, shape "
                    f"{c.shape}, bytes {c.begin}-{c.end} of {c.file}) does not fit the tensor "
                    f"shape {shape} or its file of {sizes[c.file]} bytes"
                )
            covered += math.prod(c.shape)
        if covered != math.prod(shape):
            raise CheckpointCorruptError(
                f"{where}: the chunks of tensor {key!r} cover {covered} of {math.prod(shape)} "
                "elements; the checkpoint is incomplete"
            )
        tensors[key] = TensorEntry(dtype, shape, chunks)
    world_size = int(raw["world_size"])
    for name, value in raw["state"].items():
        if isinstance(value, dict) and set(value) == {PER_RANK_TAG}:
            if sorted(value[PER_RANK_TAG], key=int) != [str(r) for r in range(world_size)]:
                raise CheckpointCorruptError(
                    f"{where}: per-rank state {name!r} lists ranks {sorted(value[PER_RANK_TAG])}, "
                    f"expected 0..{world_size - 1}"
                )
    metrics = {str(k): float(v) for k, v in raw.get("metrics", {}).items()}
    epoch = raw.get("epoch")
    rnd = raw.get("round")
    return Manifest(
        step=int(raw["step"]),
        world_size=world_size,
        files=files,
        tensors=tensors,
        state=raw["state"],
        metrics=metrics,
        epoch=None if epoch is None else int(epoch),
        run_id=raw.get("run_id"),
        round=None if rnd is None else int(rnd),
        created=float(raw.get("created", 0.0)),
    )
