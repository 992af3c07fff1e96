"""Save at breakpoint: the newest memory checkpoint of a node, copied to durable storage.

The agent runs ``python -m checkpoint.promote MEMORY_DIR DURABLE_URL`` after a worker failed,
before the next round's workers start (the launcher never imports checkpoint or torch). It
prints one JSON line: the step promoted (or null) and why. With ``--on-go`` it first waits
for a line on stdin (none: it exits), so the agent can start it ahead of a failure and the
promotion does not wait for an interpreter to import torch.

The newest committed memory checkpoint is promoted only if it is newer than every committed
durable one, and only after every byte this node holds of it verifies against its checksum.
A node's memory holds its own ranks' shards: each node's agent copies those, and whichever
agent finds the durable step directory whole commits the manifest (create-only, as every
commit: a node that loses that race finds the step committed and says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointError, StorageError
from checkpoint.format.manifest import MANIFEST_NAME
from checkpoint.io import shardfile, storage

_COPY_SLICE = 64 << 20


@dataclass(frozen=True)
class Promotion:
    """The outcome: `step` committed durably by this call (None: nothing was), and why."""

    step: int | None
    reason: str
    seconds: float = 0.0
    copied_bytes: int = 0


def promote(memory_dir: str, durable_url: str) -> Promotion:
    """Copy the newest verified memory checkpoint in `memory_dir` to `durable_url` if newer."""
    started = time.perf_counter()
    memory = CommittedCheckpoints(storage.open_location(memory_dir))
    durable = CommittedCheckpoints(storage.open_location(durable_url))
    steps = memory.steps()
    if not steps:
        return Promotion(None, "no memory checkpoint")
    step = steps[-1]
    newest_durable = max(durable.steps(), default=None)
    if newest_durable is not None and newest_durable >= step:
        return Promotion(None, f"durable step {newest_durable} is not older than memory step {step}")
    manifest = memory.manifest(step)
    per_file = manifest.chunks_by_file()
    here = [f for f in manifest.files if f.path in storage.file_sizes(memory.loc, step)]
    for entry in here:  # never an unverified byte: a corrupt memory shard is not promoted
        shardfile.verify_file(memory.loc, step, entry, per_file[entry.path])
    for entry in here:
        storage.write_durably(durable.loc, durable.loc.path(step, entry.path),
                              _read_slices(memory.loc.path(step, entry.path)))
    copied = sum(f.size for f in here)
    missing = manifest.listing_problems(storage.file_sizes(durable.loc, step))
    seconds = time.perf_counter() - started
    if missing:
        return Promotion(None, f"copied this node's {len(here)} shard files of step {step}; the step is not "
                               f"whole yet ({'; '.join(missing)}): another node's agent commits it", seconds, copied)
    text = storage.read_bytes(memory.loc, memory.loc.path(step, MANIFEST_NAME)).decode()
    try:
        storage.commit(durable.loc, step, text, replace=False)
    except StorageError as exc:
        if storage.is_committed(durable.loc, step):  # another node's agent was first
            return Promotion(None, f"step {step} was committed by another node's agent", seconds, copied)
        raise exc
    return Promotion(step, f"memory step {step} is newer than durable step {newest_durable}",
                     time.perf_counter() - started, copied)


def _read_slices(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_SLICE):
            yield chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.promote", description=__doc__.splitlines()[0])
    parser.add_argument("memory_dir", help="the node's memory-tier directory (ELASTIC_MEMORY_DIR)")
    parser.add_argument("durable_url", help="the durable checkpoint directory (--checkpoint-dir)")
    parser.add_argument("--on-go", action="store_true", help="promote once a line arrives on stdin; exit at EOF")
    args = parser.parse_args(argv)
    if args.on_go and not sys.stdin.readline():
        return 0  # the agent needed no save at breakpoint
    try:
        outcome = promote(args.memory_dir, args.durable_url)
    except CheckpointError as exc:
        print(json.dumps({"step": None, "error": str(exc)}))
        return 1
    print(json.dumps(asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
