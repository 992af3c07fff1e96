"""Save at breakpoint: the newest memory checkpoint of a node, copied to durable storage.

The agent runs ``python -m checkpoint.promote MEMORY_DIR DURABLE_URL`` after a worker failed,
while the next round starts (the launcher never imports checkpoint or torch; the agent pins
the step it asks for, so that the next round's memory retention keeps it meanwhile). It
prints one JSON line: the step promoted (or null) and why. With ``--on-go`` it promotes once
per line that arrives on stdin and exits at EOF, so the agent starts it once, ahead of any
failure, and a promotion does not wait for an interpreter to import torch
(elastic/launcher/promotion_standby.py); it then runs at a lower CPU priority (nice 10), so
that where cores are short the next round's restore does not wait for it.

The newest committed memory checkpoint is promoted only if it is newer than every committed
durable one, and only after every byte this node holds of it verifies against its checksum.
A node's memory holds its own ranks' shards and its copies of its ring predecessors' newest
checkpoints (replica_pull.py): each node's agent copies its own shards, and the shards it holds
only in a copy where durable storage lacks them, so a survivor of a node lost whole completes
the step alone; whichever agent finds the durable step directory whole commits the manifest
(create-only, as every commit: a node that loses that race finds the step committed and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointError, StorageError
from checkpoint.format.manifest import MANIFEST_NAME, Manifest
from checkpoint.io import shardfile, storage
from checkpoint.memory_tier import copies_in
from checkpoint.restore import held_here

_COPY_SLICE = 64 << 20


@dataclass(frozen=True)
class Promotion:
    """The outcome: `step` committed durably by this call (None: nothing was), and why."""

    step: int | None
    reason: str
    seconds: float = 0.0
    copied_bytes: int = 0


def promote(memory_dir: str, durable_url: str, step: int | None = None) -> Promotion:
    """Copy the newest verified memory checkpoint in `memory_dir` (its own shards and its copies
    of other nodes'), or `step` (the one the agent pinned), to `durable_url` if newer than every
    durable one; commit it there once it is whole."""
    started = time.perf_counter()
    memory = CommittedCheckpoints(storage.open_location(memory_dir))
    held = [memory, *copies_in(memory_dir)]
    steps = sorted(set().union(*(h.steps() for h in held)))
    if not steps:
        return Promotion(None, "no memory checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        return Promotion(None, f"memory step {step} is no longer held (newest: {steps[-1]})")
    durable = CommittedCheckpoints(storage.open_location(durable_url))
    newest_durable = max(durable.steps(), default=None)
    if newest_durable is not None and newest_durable >= step:
        return Promotion(None, f"durable step {newest_durable} is not older than memory step {step}")
    manifest, here, not_held = held_here([h for h in held if step in h.steps()], step)
    marker = storage.mark_promoting(durable.loc, step)  # the next round's pruning leaves the step alone
    try:
        return _copy_and_commit(memory, durable, here, manifest, not_held, step, started)
    finally:
        storage.remove_files(durable.loc, [marker])


def _copy_and_commit(memory: CommittedCheckpoints, durable: CommittedCheckpoints, here: storage.Location,
                     manifest: Manifest, not_held: list[str], step: int, started: float) -> Promotion:
    """Copy the shards durable storage lacks (each verified first), then commit once whole."""
    per_file = manifest.chunks_by_file()
    own = storage.file_sizes(memory.loc, step)
    held_files = [f for f in manifest.files if f.path not in not_held]
    mine = [f for f in held_files if own.get(f.path) == f.size]
    theirs = [f for f in held_files if f not in mine]  # in a copy only: their node may be lost
    copied: list[int] = []  # sizes
    for batch in (mine, theirs):
        # Each file only where durable storage lacks it: another node's agent may have placed
        # it meanwhile (whole: _place), from its own memory or its copy.
        present = storage.file_sizes(durable.loc, step)
        for entry in batch:
            if present.get(entry.path) != entry.size:
                shardfile.verify_file(here, step, entry, per_file[entry.path])  # never an unverified byte
                _place(durable.loc, durable.loc.path(step, entry.path), _read_slices(here.path(step, entry.path)))
                copied.append(entry.size)
    missing = manifest.listing_problems(storage.file_sizes(durable.loc, step))
    seconds = time.perf_counter() - started
    if missing:
        return Promotion(None, f"copied {len(copied)} shard files of step {step} held on this node; the step "
                               f"is not whole yet ({'; '.join(missing)}): another node's agent commits it", seconds,
                         sum(copied))
    text = storage.read_bytes(memory.loc, here.path(step, MANIFEST_NAME)).decode()
    # The next round runs alongside (its pruning leaves this step alone: the marker); once it
    # committed a newer durable step, this older one has nothing left to save.
    newest_durable = max(durable.steps(), default=None)
    if newest_durable is not None and newest_durable > step:
        return Promotion(None, f"durable step {newest_durable} was committed meanwhile", seconds, sum(copied))
    try:
        storage.commit(durable.loc, step, text, replace=False)
    except StorageError:
        if storage.is_committed(durable.loc, step):  # another node's agent was first
            return Promotion(None, f"step {step} was committed by another node's agent", seconds, sum(copied))
        raise
    return Promotion(step, f"memory step {step} is newer than durable step {newest_durable}",
                     time.perf_counter() - started, sum(copied))


def _place(loc: storage.Location, path: str, parts: Iterator[bytes]) -> None:
    """Write a shard file that appears whole or not at all: two nodes' agents may copy the same
    shard at once (one from its own memory, one from its copy), and the first to find the step
    whole commits it. Locally a temporary file renamed into place (the commit's directory
    fsync makes the rename durable); an object store's object appears whole when closed."""
    if not loc.is_local:
        storage.write_durably(loc, path, parts)
        return
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex}.tmp")
    storage.write_durably(loc, tmp, parts)
    os.replace(tmp, path)


def _read_slices(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_SLICE):
            yield chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.promote", description=__doc__.splitlines()[0])
    parser.add_argument("memory_dir", help="the node's memory-tier directory (ELASTIC_MEMORY_DIR)")
    parser.add_argument("durable_url", help="the durable checkpoint directory (--checkpoint-dir)")
    parser.add_argument("--on-go", action="store_true",
                        help="promote once per line that arrives on stdin ('go', or 'go STEP': that step); exit "
                             "at EOF")
    args = parser.parse_args(argv)
    if not args.on_go:
        return _report(args.memory_dir, args.durable_url)
    # The standby's promotion runs beside the next round, whose ranks are restoring: where
    # cores are short, theirs come first (the agent still waits for it at exit).
    os.nice(10)
    while line := sys.stdin.readline():  # the agent's standby process: one promotion per failure
        words = line.split()
        _report(args.memory_dir, args.durable_url, int(words[1]) if len(words) > 1 else None)
    return 0


def _report(memory_dir: str, durable_url: str, step: int | None = None) -> int:
    """One promotion, its outcome printed as a JSON line; 1 if it failed."""
    try:
        outcome = asdict(promote(memory_dir, durable_url, step))
    except CheckpointError as exc:
        outcome = {"step": None, "error": str(exc)}
    except FileNotFoundError as exc:  # the next round's retention took a file (not one pinned)
        outcome = {"step": None, "reason": f"a file vanished under the copy: {exc}"}
    print(json.dumps(outcome), flush=True)
    return 0 if "error" not in outcome else 1


if __name__ == "__main__":
    sys.exit(main())
