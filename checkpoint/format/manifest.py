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
file, chunks that do not tile their tensor exactly once (overlap, gap, outside it), a state
entry naming a tensor that is not listed, or any field of the wrong type all raise
CheckpointCorruptError naming the manifest, never a KeyError or TypeError.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from checkpoint.errors import CheckpointCorruptError
from checkpoint.format.statedict import ITEMS_TAG, PER_RANK_TAG, TENSOR_TAG, TUPLE_TAG
from checkpoint.format.tiling import tiling_problem

try:  # the same CRC-32 as zlib's, ~8x faster (carry-less multiply); both release the GIL
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # no wheel for this platform: zlib's own, a few GB/s
    _crc32 = zlib.crc32

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TIERS = ("memory", "durable")
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
    # The tier the save was committed to: "memory" (the node's shared memory; also in durable
    # storage when saved there at breakpoint) or "durable". Absent (older writers): durable.
    tier: str = "durable"
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
        # Not asdict(self): it would deep-copy `state` (JSON values already) element by element,
        # milliseconds for the thousands of ints of every rank's RNG streams.
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record.update(files=[asdict(f) for f in self.files], tensors={k: asdict(t) for k, t in self.tensors.items()})
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes, *, where: str) -> Manifest:
        """Parse and validate; `where` names the manifest in every error message."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointCorruptError(f"{where}: manifest is not valid JSON ({exc})") from exc
        try:
            return _parse(raw, where)
        except _Malformed as exc:
            raise CheckpointCorruptError(
                f"{where}: manifest does not follow format_version {FORMAT_VERSION}: {exc}"
            ) from exc


class _Malformed(ValueError):
    """A field of the manifest has the wrong type or value (the message names the field)."""


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Malformed(f"{what} must be a JSON list, got {type(value).__name__}")
    return value


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:  # bool is an int subclass: refused
        raise _Malformed(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{what} must be a string, got {type(value).__name__}")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise _Malformed(f"{what} must be a number, got {value!r}")
    return float(value)


def _optional(value: Any, what: str, read: Any) -> Any:
    return None if value is None else read(value, what)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is list and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)  # the common case, without building a name per element
    return tuple(_int(v, f"{what}[{i}]") for i, v in enumerate(_list(value, what)))


def _parse(raw: Any, where: str) -> Manifest:
    raw = _object(raw, "the manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{where}: format_version {version!r} is not supported; this reader understands "
            f"{FORMAT_VERSION}. Load it with the version of the package that wrote it."
        )
    files = _files(raw.get("files"), where)
    sizes = {f.path: f.size for f in files}
    tensors = {
        key: _tensor(key, t, sizes, where) for key, t in _object(raw.get("tensors"), "tensors").items()
    }
    world_size = _int(raw.get("world_size"), "world_size", minimum=1)
    state = _object(raw.get("state"), "state")
    _check_skeleton(state, tensors, world_size, where)
    metrics = {k: _number(v, f"metrics[{k!r}]") for k, v in _object(raw.get("metrics", {}), "metrics").items()}
    return Manifest(
        step=_int(raw.get("step"), "step"),
        world_size=world_size,
        files=files,
        tensors=tensors,
        state=state,
        metrics=metrics,
        epoch=_optional(raw.get("epoch"), "epoch", _int),
        run_id=_optional(raw.get("run_id"), "run_id", _str),
        round=_optional(raw.get("round"), "round", _int),
        created=_number(raw.get("created", 0.0), "created"),
        tier=_tier(raw.get("tier", "durable")),
    )


def _tier(value: Any) -> str:
    if value not in TIERS:
        raise _Malformed(f"tier must be one of {list(TIERS)}, not {value!r}")
    return value


def _files(raw: Any, where: str) -> tuple[FileEntry, ...]:
    files = []
    for i, f in enumerate(_list(raw, "files")):
        f = _object(f, f"files[{i}]")
        entry = FileEntry(
            _str(f.get("path"), f"files[{i}].path"), _int(f.get("size"), f"files[{i}].size"),
            _int(f.get("header_size"), f"files[{i}].header_size"),
            _str(f.get("header_checksum"), f"files[{i}].header_checksum"),
        )
        if not is_safe_name(entry.path):
            raise CheckpointCorruptError(
                f"{where}: file path {entry.path!r} is not a bare file name; manifest paths must "
                "stay inside the step directory. Refusing to read this checkpoint."
            )
        files.append(entry)
    return tuple(files)


def _tensor(key: str, raw: Any, sizes: Mapping[str, int], where: str) -> TensorEntry:
    what = f"tensors[{key!r}]"
    t = _object(raw, what)
    shape = _ints(t.get("shape"), f"{what}.shape")
    dtype = _str(t.get("dtype"), f"{what}.dtype")
    if dtype not in _BY_NAME:
        raise CheckpointCorruptError(f"{where}: tensor {key!r} has unknown dtype {dtype!r}")
    itemsize = torch.empty((), dtype=_BY_NAME[dtype]).element_size()
    chunks = tuple(_chunk(c, f"{what}.chunks[{i}]") for i, c in enumerate(_list(t.get("chunks"), f"{what}.chunks")))
    for c in chunks:
        if c.file not in sizes:
            raise CheckpointCorruptError(
                f"{where}: tensor {key!r} points to {c.file!r}, which is not in the file list"
            )
        if c.end - c.begin != math.prod(c.shape) * itemsize or c.end > sizes[c.file]:
            raise CheckpointCorruptError(
                f"{where}: chunk {c.name!r} of tensor {key!r} (shape {c.shape}, bytes "
                f"{c.begin}-{c.end} of {c.file}) does not fit its {dtype} elements or its file of "
                f"{sizes[c.file]} bytes"
            )
    problem = tiling_problem(shape, [(c.offsets, c.shape) for c in chunks])
    if problem is not None:
        raise CheckpointCorruptError(
            f"{where}: the chunks of tensor {key!r} do not tile it exactly once: {problem}; "
            "the checkpoint is incomplete or damaged"
        )
    return TensorEntry(dtype, shape, chunks)


def _chunk(raw: Any, what: str) -> ChunkEntry:
    c = _object(raw, what)
    return ChunkEntry(
        _str(c.get("file"), f"{what}.file"), _str(c.get("name"), f"{what}.name"),
        _ints(c.get("offsets"), f"{what}.offsets"), _ints(c.get("shape"), f"{what}.shape"),
        _int(c.get("begin"), f"{what}.begin"), _int(c.get("end"), f"{what}.end"),
        _str(c.get("checksum"), f"{what}.checksum"),
    )


def _check_skeleton(state: dict[str, Any], tensors: Mapping[str, TensorEntry], world_size: int, where: str) -> None:
    """Every tagged node of the state skeleton well formed, every tensor it names listed.
    Iterative: a hostile manifest nested thousands deep must not exhaust the stack."""
    pending: list[tuple[Any, str]] = []
    for name, value in state.items():
        if isinstance(value, dict) and PER_RANK_TAG in value:
            ranks = _object(value[PER_RANK_TAG], f"state[{name!r}].{PER_RANK_TAG}")
            # The length first: a hostile world_size must not build a set of a billion names.
            if len(value) != 1 or len(ranks) != world_size or set(ranks) != {str(r) for r in range(world_size)}:
                raise CheckpointCorruptError(
                    f"{where}: per-rank state {name!r} lists ranks {sorted(ranks)}, "
                    f"expected 0..{world_size - 1}"
                )
            pending += [(v, f"state[{name!r}] of rank {r}") for r, v in ranks.items()]
        else:
            pending.append((value, f"state[{name!r}]"))
    while pending:
        node, what = pending.pop()
        if isinstance(node, list):
            pending += [(v, what) for v in node]
        elif isinstance(node, dict):
            pending += _tagged_children(node, what, tensors, where)


def _tagged_children(
    node: dict[str, Any], what: str, tensors: Mapping[str, TensorEntry], where: str
) -> list[tuple[Any, str]]:
    """The children of one skeleton dict to check next, after checking its tag if it has one."""
    if TENSOR_TAG in node:
        key = node[TENSOR_TAG]
        if len(node) != 1 or not isinstance(key, str) or key not in tensors:
            raise CheckpointCorruptError(f"{where}: {what} refers to tensor {key!r}, which is not in the manifest")
        return []
    if ITEMS_TAG in node or TUPLE_TAG in node:
        tag = ITEMS_TAG if ITEMS_TAG in node else TUPLE_TAG
        if len(node) != 1:
            raise _Malformed(f"{what}: {tag} must be the only key of its object")
        values = _list(node[tag], f"{what}.{tag}")
        if tag == TUPLE_TAG:
            return [(v, what) for v in values]
        for pair in values:
            if not (isinstance(pair, list) and len(pair) == 2 and _is_json_scalar(pair[0])):
                raise _Malformed(f"{what}: every {ITEMS_TAG} entry must be a [JSON scalar key, value] pair")
        return [(pair[1], what) for pair in values]
    if PER_RANK_TAG in node:
        raise _Malformed(f"{what}: {PER_RANK_TAG} is allowed only at the top of a state entry")
    return [(v, what) for v in node.values()]


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
