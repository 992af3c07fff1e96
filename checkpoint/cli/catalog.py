"""A read-only view of one checkpoint root, for `elastic-ckpt`.

`open_root` checks the URL once, at the boundary (exists, is a directory, holds step
directories, can be listed) and raises one named error with one clear message otherwise.
`scan` lists every step directory with its status: "committed" (a manifest that parses),
"incomplete" (no manifest: a crash leftover or a save in flight) or "corrupt" (a manifest
that does not parse, e.g. one naming a path outside its step directory, or a shard that
the listing shows missing or of the wrong size). Manifests are read
through the CheckpointManager, so the CLI and the manager apply the same rules.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from checkpoint import retention
from checkpoint.io import shardfile, storage
from checkpoint.errors import CheckpointCorruptError, CheckpointNotFoundError, StorageError
from checkpoint.manager import CheckpointManager
from checkpoint.format.manifest import Manifest

COMMITTED, INCOMPLETE, CORRUPT = "committed", "incomplete", "corrupt"


@dataclass(frozen=True)
class Root:
    """An opened checkpoint root: where it is and a manager to read it with."""

    loc: storage.Location
    manager: CheckpointManager


@dataclass(frozen=True)
class StepEntry:
    """One step directory as found on storage."""

    step: int
    status: str
    manifest: Manifest | None
    error: str | None
    nbytes: int
    nfiles: int
    modified: float | None


def open_root(url: str, storage_options: dict[str, Any] | None = None, **policy: Any) -> Root:
    """Open `url` as a checkpoint root; `policy` is passed to CheckpointManager (retention)."""
    loc = storage.open_location(url, storage_options)
    try:
        with _denial_named(url):
            info = loc.fs.info(loc.root)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{url} does not exist; pass the checkpoint directory given to CheckpointManager "
            "or elastic-run --checkpoint-dir"
        ) from exc
    if info.get("type") != "directory":
        raise CheckpointNotFoundError(
            f"{url} is a file, not a checkpoint root; pass the directory that holds the "
            "step_<12 digits> directories"
        )
    _require_steps(loc)
    return Root(loc=loc, manager=CheckpointManager(url, storage_options=storage_options, **policy))


def _denied(url: str, exc: PermissionError) -> StorageError:
    return StorageError(
        f"permission denied reading {url} ({exc.strerror or exc}); check its permissions "
        "or credentials (--storage-option) and run as a user who can read it"
    )


@contextlib.contextmanager
def _denial_named(url: str) -> Iterator[None]:
    """A permission problem reading `url` named as such, also when storage wrapped it."""
    try:
        yield
    except PermissionError as exc:
        raise _denied(url, exc) from exc
    except StorageError as exc:
        if not isinstance(exc.__cause__, PermissionError):
            raise
        raise _denied(url, exc.__cause__) from exc


def _require_steps(loc: storage.Location) -> None:
    with _denial_named(loc.url):
        if storage.step_dirs(loc):
            return
    name = storage.base_name(loc.root)
    if storage.step_of(name) is not None:
        parent = loc.url.rstrip("/").rsplit("/", 1)[0]
        raise CheckpointNotFoundError(
            f"{loc.url} is one step directory, not a checkpoint root; pass its parent {parent}"
        )
    names = sorted(storage.base_name(p) for p in loc.fs.ls(loc.root, detail=False))
    found = f"it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else "it is empty"
    raise CheckpointNotFoundError(
        f"{loc.url} is not a checkpoint root: no step_<12 digits> directories in it ({found}); "
        "pass the directory given to CheckpointManager or elastic-run --checkpoint-dir"
    )


def _mtime(entry: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
    return None


def _files(loc: storage.Location, path: str) -> list[dict[str, Any]]:
    with _denial_named(path):
        return [e for e in loc.fs.ls(path, detail=True) if e.get("type") == "file"]


def scan(root: Root) -> list[StepEntry]:
    """Every step directory, ascending by step, with its status, size and file count."""
    committed = set(root.manager.steps())
    with _denial_named(root.loc.url):
        dirs = storage.step_dirs(root.loc)
    entries = []
    for step, path in sorted(dirs.items()):
        files = _files(root.loc, path)
        manifest, error, status = None, None, INCOMPLETE
        if step in committed:
            try:
                manifest, status = root.manager.manifest(step), COMMITTED
            except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
                error, status = str(exc), CORRUPT
            else:
                sizes = {storage.base_name(e["name"]): int(e.get("size") or 0) for e in files}
                problems = manifest.listing_problems(sizes)
                if problems:
                    error, status = "; ".join(problems), CORRUPT
        times = [t for t in map(_mtime, files) if t is not None]
        entries.append(
            StepEntry(
                step=step,
                status=status,
                manifest=manifest,
                error=error,
                nbytes=sum(int(e.get("size") or 0) for e in files),
                nfiles=len(files),
                modified=max(times) if times else None,
            )
        )
    return entries


def infos(entries: Sequence[StepEntry]) -> list[retention.CheckpointInfo]:
    """Ranking inputs: committed checkpoints not found corrupt (load() would skip those too)."""
    return [
        retention.CheckpointInfo(e.step, e.manifest.metrics)
        for e in entries
        if e.manifest is not None and e.status == COMMITTED
    ]


def metric_names(entries: Sequence[StepEntry]) -> list[str]:
    return sorted({name for e in entries if e.manifest is not None for name in e.manifest.metrics})


def check(root: Root, manifest: Manifest, on_chunk: Callable[[int], None] | None = None) -> list[str]:
    """Re-hash every file of a committed checkpoint; one message per bad file (empty: all good).

    `on_chunk(nbytes)` reports progress; over a whole check the calls add up to total_bytes.
    """
    per_file = manifest.chunks_by_file()
    bad = []
    for f in manifest.files:
        try:
            shardfile.verify_file(root.loc, manifest.step, f, per_file[f.path], on_chunk=on_chunk)
        except CheckpointCorruptError as exc:
            bad.append(str(exc))
        if on_chunk is not None:
            on_chunk(f.header_size)
    return bad


def total_bytes(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.files)
