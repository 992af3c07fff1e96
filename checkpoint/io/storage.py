"""A few fsspec calls that make local disk, memory:// and object stores behave the same.

Layout: `<root>/step_<12 digits>/` holds the shard files and `manifest.json`. Shards are
written first and made durable; the manifest is written last and is the commit:
- local disk: write a temp file, fsync it, move it to `manifest.json`, then fsync every
  directory on the way up whose entry is new (the step directory, the root, and any parent
  of the root the save created), all before retention may delete anything: after a power
  cut the new checkpoint is there, or the old ones still are;
- anything else (memory://, s3://, gs://): one whole-object put; the object appearing is the
  commit, no rename is needed (object stores make a put visible all at once).
Deleting a checkpoint removes the manifest first, so a half-deleted step is never "committed".

A commit never replaces a manifest it has not seen (`replace=False`): the round fence is
checked before the manifest is written, so a newer round may commit the same step in
between, and that manifest must survive. The write is then create-only: a hard link
locally, `mode="create"` elsewhere (S3 `If-None-Match: *` through s3fs, GCS generation
match 0 through gcsfs, an exclusive open in memory://). Remaining windows: a store that
ignores the condition (an S3-compatible server without conditional writes) or has no atomic
create (fsspec then checks and puts), a local filesystem without hard links (a plain
rename), and a save of a step that was already committed before the check (it replaces
what it saw with a plain put or rename) still overwrite whatever landed in between.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from checkpoint.errors import StorageError
from checkpoint.format.manifest import MANIFEST_NAME

_STEP_DIR = re.compile(r"^step_(\d{12})$")
_UPLOAD_SLICE = 64 << 20


@dataclass(frozen=True)
class Location:
    """Where checkpoints live: an fsspec filesystem and the root path inside it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def step_dir(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return f"{self.root}/step_{step:012d}"

    def path(self, step: int, name: str) -> str:
        return f"{self.step_dir(step)}/{name}"

    def holder(self, name: str) -> Location:
        """Where file `name` of a step is read (a restore may read the files of one step from
        several places: checkpoint.restore)."""
        return self


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    try:
        fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise StorageError(
            f"cannot open checkpoint directory {url!r}: {exc}. Use a local path or an fsspec URL "
            "(memory://..., s3://bucket/prefix) and pass credentials in storage_options."
        ) from exc
    return Location(fs=fs, root=root.rstrip("/") or "/", url=str(url))


def base_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def step_of(name: str) -> int | None:
    """The step a directory named `name` holds (`step_<12 digits>`), or None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def _storage_error(action: str, path: str, exc: BaseException) -> StorageError:
    return StorageError(f"could not {action} {path!r}: {exc}", path=path)


def step_dirs(loc: Location) -> dict[int, str]:
    """Every step directory present, committed or not."""
    loc.fs.invalidate_cache(loc.root)  # another rank or process may have written since
    try:
        entries = loc.fs.ls(loc.root, detail=False) if loc.fs.exists(loc.root) else []
    except OSError as exc:
        raise _storage_error("list", loc.root, exc) from exc
    found = {}
    for entry in entries:
        step = step_of(base_name(entry))
        if step is not None:
            found[step] = entry.rstrip("/")
    return found


def committed_steps(loc: Location) -> list[int]:
    """Steps whose manifest exists, ascending. Uncommitted leftovers are not listed."""
    pattern = f"{loc.root}/step_*/{MANIFEST_NAME}"
    loc.fs.invalidate_cache(loc.root)  # listings are cached by some backends (s3fs)
    try:
        paths = loc.fs.glob(pattern)
    except OSError as exc:
        raise _storage_error("list", pattern, exc) from exc
    steps = (step_of(p.rstrip("/").rsplit("/", 2)[-2]) for p in paths)  # <root>/step_<N>/manifest.json
    return sorted(step for step in steps if step is not None)


def read_bytes(loc: Location, path: str) -> bytes:
    """Whole small file (a manifest). FileNotFoundError passes through for the caller to name."""
    try:
        return loc.fs.cat_file(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _storage_error("read", path, exc) from exc


def file_size(loc: Location, path: str) -> int:
    if loc.is_local:
        return os.stat(path).st_size
    return int(loc.fs.size(path))


def write_durably(loc: Location, path: str, parts: Iterable[memoryview | bytes]) -> None:
    """Write a file and return only once it is durable (fsync locally; closed upload elsewhere)."""
    try:
        if loc.is_local:
            created = _make_dirs(os.path.dirname(path))
            with open(path, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dirs([os.path.dirname(path)] + [os.path.dirname(d) for d in created])
        else:
            with loc.fs.open(path, "wb") as f:
                for part in parts:
                    # Buffered object-store files copy what they are given and upload a part
                    # per block; slices keep that copy to one slice instead of the whole shard.
                    view = memoryview(part)
                    for start in range(0, len(view), _UPLOAD_SLICE):
                        f.write(view[start : start + _UPLOAD_SLICE])
    except OSError as exc:
        raise _storage_error("write", path, exc) from exc


def is_committed(loc: Location, step: int) -> bool:
    """Whether `step` has a manifest now (a save of it would replace one)."""
    loc.fs.invalidate_cache(loc.step_dir(step))
    return bool(loc.fs.exists(loc.path(step, MANIFEST_NAME)))


def commit(loc: Location, step: int, manifest_text: str, *, replace: bool) -> str:
    """Write the manifest of `step` atomically; after this returns the checkpoint is committed.

    With `replace=False` an existing manifest is never overwritten (see the module docstring):
    StorageError says another writer committed the step first.
    """
    final = loc.path(step, MANIFEST_NAME)
    data = manifest_text.encode()
    try:
        if loc.is_local:
            _commit_local(loc, step, data, replace)
        else:
            if replace:
                loc.fs.pipe_file(final, data)
            else:
                loc.fs.pipe_file(final, data, mode="create")
    except FileExistsError as exc:
        raise StorageError(
            f"step {step} was not committed: {final!r} appeared while this save was committing "
            "(another writer, e.g. a newer rendezvous round, committed the same step); it was left "
            "as it is", path=final,
        ) from exc
    except OSError as exc:
        raise _storage_error("commit the manifest", final, exc) from exc
    return final


def _commit_local(loc: Location, step: int, data: bytes, replace: bool) -> None:
    step_dir, final = loc.step_dir(step), loc.path(step, MANIFEST_NAME)
    created = _make_dirs(step_dir)  # no shard was written if the state has no tensor
    tmp = loc.path(step, f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        linked = not replace and _link_new(tmp, final)
    except FileExistsError:
        os.unlink(tmp)
        raise
    if not linked:
        os.replace(tmp, final)
    # The new entries, bottom up: the manifest's, the step directory's, and those of every
    # directory this commit created. Durable before anything (retention, the temp) is deleted.
    _fsync_dirs([step_dir, os.path.dirname(step_dir)] + [os.path.dirname(d) for d in created])
    if linked:
        os.unlink(tmp)


def _link_new(tmp: str, final: str) -> bool:
    """Create `final` as a hard link to `tmp` unless it exists (FileExistsError); False when
    the filesystem has no hard links (the caller renames instead)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        if os.path.samefile(tmp, final):  # NFS: a retransmitted link reports EEXIST for our own link
            return True
        raise
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            return False
        raise
    return True


def delete_step(loc: Location, step: int) -> None:
    """Uncommit (manifest first), then remove the directory."""
    manifest = loc.path(step, MANIFEST_NAME)
    try:
        if loc.fs.exists(manifest):
            loc.fs.rm_file(manifest)
            if loc.is_local:
                _fsync_dir(loc.step_dir(step))
        if loc.fs.exists(loc.step_dir(step)):
            loc.fs.rm(loc.step_dir(step), recursive=True)
    except OSError as exc:
        raise _storage_error("delete", loc.step_dir(step), exc) from exc


# In an uncommitted step directory: a save at breakpoint (checkpoint/promote.py) is copying
# into it while the job's next round runs, so pruning must leave it alone. Each promotion
# (several nodes' agents may copy into one step) writes its own marker before its first
# shard and removes it once it answered. A marker older than PROMOTING_FRESH seconds is a
# crashed promotion's, and its step is a leftover again.
PROMOTING = ".promoting-"
PROMOTING_FRESH = 600.0


def mark_promoting(loc: Location, step: int) -> str:
    """Write a promotion marker into `step`'s directory; its path, for unmark."""
    path = loc.path(step, f"{PROMOTING}{uuid.uuid4().hex}")
    write_durably(loc, path, [repr(time.time()).encode()])
    return path


def being_promoted(loc: Location, step: int) -> bool:
    """Whether a fresh promotion marker protects uncommitted `step` from pruning."""
    for name in promotion_markers(loc, step):
        try:
            if time.time() - float(read_bytes(loc, loc.path(step, name))) < PROMOTING_FRESH:
                return True
        except (FileNotFoundError, ValueError, StorageError):
            continue  # removed meanwhile, or not ours to read: not a fresh marker
    return False


def promotion_markers(loc: Location, step: int) -> list[str]:
    return [name for name in file_sizes(loc, step) if name.startswith(PROMOTING)]


def remove_files(loc: Location, paths: Iterable[str]) -> None:
    for path in paths:
        try:
            loc.fs.rm_file(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _storage_error("delete", path, exc) from exc


def file_sizes(loc: Location, step: int) -> dict[str, int]:
    """Bare name -> size of every file in the step directory (one listing; empty if absent)."""
    try:
        entries = loc.fs.ls(loc.step_dir(step), detail=True)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _storage_error("list", loc.step_dir(step), exc) from exc
    return {
        base_name(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") == "file"
    }


def _make_dirs(path: str) -> list[str]:
    """Create `path` and its missing parents; the ones this call found missing, deepest first."""
    missing, d = [], os.path.abspath(path)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        missing.append(d)
        d = os.path.dirname(d)
    os.makedirs(path, exist_ok=True)
    return missing


def _fsync_dirs(paths: Iterable[str]) -> None:
    """fsync each directory once, in order: makes the entries made in it durable."""
    for path in dict.fromkeys(paths):
        _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
