"""Loading a checkpoint on every rank, with the fallback the ranks agree on; verifying one.

Every rank reads, for each tensor, only the chunks that intersect the region it holds,
verifying each chunk as it is read. Ranks agree on the outcome by a gather: if any rank
finds the checkpoint damaged, all fall back together to the next candidate.

The candidates come from one or more sources, newest step first and, for one step, in the
order given (the memory tier before durable storage). A node-local source (each node's
memory holds only its own ranks' shards, plus the copies its agent pulled of its ring
predecessors' newest checkpoints) offers a step only when every rank lists it (in its own
directory or a copy), and is read only when this node holds every file its manifest names,
each file from whichever of its directories has it: that is how a node lost whole is
restored from a survivor's copy. A restore never reads another node's memory (a spare's agent
fetches the step before its workers start: elastic/launcher/replica_pull.py), so a step not
whole on the node falls back.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoint.collectives import RankGroup
from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    StorageError,
)
from checkpoint.format import statedict
from checkpoint.format.manifest import Manifest
from checkpoint.io import loading, shardfile, storage

log = logging.getLogger(__name__)

# Rebuilds on every rank the error another rank hit while loading (agreement is by type name).
_ERRORS_BY_NAME: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (CheckpointCorruptError, CheckpointNotFoundError, CheckpointMismatchError, StorageError)
}


@dataclass(frozen=True)
class Source:
    """A location load() reads from: its tier's name, and whether each node has its own."""

    committed: CommittedCheckpoints
    tier: str  # "memory" or "durable"
    node_local: bool = False
    # Node-local only: this node's copies of other nodes' checkpoints, listed anew at each load
    # (the agent adds them while the job runs).
    copies: Callable[[], list[CommittedCheckpoints]] = list
    found_corrupt: set[int] = field(default_factory=set)  # by this process's loads: never tried again

    def steps(self) -> list[int]:
        """The committed steps found here (own directory or a copy), ascending."""
        return sorted(set(self.committed.steps()).union(*(c.steps() for c in self.copies())))

    def mark_corrupt(self, step: int) -> None:
        self.found_corrupt.add(step)
        self.committed.mark_corrupt(step)


@dataclass(frozen=True)
class _Spread(storage.Location):
    """A location whose files of one step lie in several local directories of this node."""

    dirs: Mapping[str, str] = field(default_factory=dict)  # file name -> the step directory holding it

    def path(self, step: int, name: str) -> str:
        return f"{self.dirs[name]}/{name}" if name in self.dirs else super().path(step, name)


@dataclass(frozen=True)
class Restored:
    """What load() loaded: the step, and the tier it came from."""

    step: int
    tier: str


def load(
    sources: Sequence[Source], ranks: RankGroup, state: MutableMapping[str, Any], step: int | None
) -> Restored | None:
    """Load `step` (default: the newest that loads) into `state` on every rank; what was loaded.

    A collective. Only a checkpoint found damaged or vanished falls back to the next
    candidate: an older one when `step` is None, else the same step from the next source.
    """
    candidates = _candidates(sources, ranks, step)
    if not candidates:
        return None
    _, targets, _ = statedict.flatten_state(state, ranks.rank)
    failures = []
    for index, (cand, source) in enumerate(candidates):
        url = source.committed.loc.url
        loaded, error = _read(source, ranks, state, targets, cand)
        errors = ranks.all_gather(None if error is None else [type(error).__name__, str(error)])
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not bad:
            statedict.apply(state, loaded)
            log.info("checkpoint %s: rank %d loaded step %d (%s tier)", url, ranks.rank, cand, source.tier)
            return Restored(cand, source.tier)
        rank, (kind, message) = bad[0]
        reason = f"rank {rank}: {message}"
        if error is None:
            error = _ERRORS_BY_NAME.get(kind, CheckpointError)(reason)
        # Only a damaged or vanished checkpoint is a reason to try another; a model that does
        # not fit or a storage outage would fail on the others too.
        damaged = all(e[0] in ("CheckpointCorruptError", "CheckpointNotFoundError") for _, e in bad)
        if damaged:
            source.mark_corrupt(cand)
        last = index == len(candidates) - 1
        if not damaged or (step is not None and last):
            raise error
        failures.append(f"step {cand} ({source.tier}): {reason}")
        if last:
            then = "no other checkpoint to fall back to"
        else:
            nxt, nxt_source = candidates[index + 1]
            then = f"falling back to step {nxt} in {nxt_source.committed.loc.url} ({nxt_source.tier} tier)"
        warnings.warn(
            f"checkpoint step {cand} in {url} ({source.tier} tier) cannot be loaded ({reason}); {then}",
            RuntimeWarning,
            stacklevel=3,  # the caller of CheckpointManager.load()
        )
    where = " or ".join(s.committed.loc.url for s in sources)
    raise CheckpointCorruptError(f"no committed checkpoint in {where} could be loaded: " + "; ".join(failures))


def _candidates(sources: Sequence[Source], ranks: RankGroup, step: int | None) -> list[tuple[int, Source]]:
    """The (step, source) pairs to try: newest step first, then in the order of `sources`.
    A shared location is listed by rank 0; a node-local one offers the steps every rank lists."""
    found: list[tuple[int, int]] = []
    for order, source in enumerate(sources):
        if source.node_local:
            listed = ranks.all_gather(source.steps())
            steps = set(listed[0]).intersection(*listed[1:])
        else:
            steps = ranks.broadcast(source.committed.steps() if ranks.rank == 0 else None)
        found += [(s, order) for s in steps]
    found.sort(key=lambda c: (-c[0], c[1]))
    if step is not None:
        if step not in {s for s, _ in found}:
            where = " or ".join(s.committed.loc.url for s in sources)
            raise CheckpointNotFoundError(f"no committed checkpoint for step {step} in {where}; "
                                          f"committed: {sorted({s for s, _ in found})}")
        found = [c for c in found if c[0] == step]
    return [(s, sources[order]) for s, order in found]


def _read(
    source: Source,
    ranks: RankGroup,
    state: Mapping[str, Any],
    targets: Mapping[str, torch.Tensor],
    step: int,
) -> tuple[dict[str, Any] | None, Exception | None]:
    """This rank's part of `step`, or the error that stopped reading it."""
    try:
        if source.node_local:
            whole, loc = _check_whole_here(source, step)
        else:
            whole, loc = source.committed.manifest(step), source.committed.loc
        manifest, entries = loading.rank_view(whole, state, ranks.rank, ranks.world)
        loading.check_fit(manifest, entries, targets)
        return loading.read_state(loc, manifest, entries, targets), None
    except (CheckpointError, OSError) as exc:  # every rank must reach the agreement that follows
        return None, exc


def _check_whole_here(source: Source, step: int) -> tuple[Manifest, storage.Location]:
    """A node-local step is read only when this node holds every file its manifest names, in
    its own directory or in its copies of other nodes' (the sizes as listed; the checksums are
    checked as it is read). Returns the manifest and where each file is read from."""
    own = source.committed
    holders = [c for c in [own, *source.copies()] if step in c.steps()]
    if not holders or step in source.found_corrupt:
        why = "found corrupt while loading" if holders else "gone from this node"
        raise CheckpointNotFoundError(f"{source.tier} checkpoint step {step} in {own.loc.url}: {why}")
    if holders[0] is own and own.damage(own.manifest(step)) is None:
        return own.manifest(step), own.loc  # the usual case: one node, or no node lost
    manifest, loc, missing = held_here(holders, step)
    if missing:
        raise CheckpointNotFoundError(
            f"{source.tier} checkpoint step {step} in {own.loc.url} is not whole on this node: "
            f"{', '.join(missing)} held neither here nor in a copy of another node's memory "
            f"({', '.join(h.loc.url for h in holders)}); shards only in other nodes' memory are not fetched"
        )
    return manifest, loc


def held_here(holders: Sequence[CommittedCheckpoints], step: int) -> tuple[Manifest, storage.Location, list[str]]:
    """Committed `step` as a node's local directories `holders` (its own first, then its copies
    of other nodes', each holding the step) hold it: the manifest, a location reading each file
    it names from the first holder that has it at its listed size, and the files none has."""
    manifest = holders[0].manifest(step)
    dirs: dict[str, str] = {}
    for holder in holders:
        sizes = storage.file_sizes(holder.loc, step)
        dirs.update({f.path: holder.loc.step_dir(step) for f in manifest.files
                     if f.path not in dirs and sizes.get(f.path) == f.size})
    missing = [f.path for f in manifest.files if f.path not in dirs]
    own = holders[0].loc
    return manifest, _Spread(own.fs, own.root, own.url, dirs), missing


def preflight(committed: CommittedCheckpoints, ranks: RankGroup, state: Mapping[str, Any], step: int | None) -> None:
    """Raise CheckpointMismatchError naming every key/shape/dtype of `step` (default: the
    latest) that does not fit `state`."""
    if step is None:
        step = committed.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {committed.loc.url}")
    _, targets, _ = statedict.flatten_state(state, ranks.rank)
    manifest, entries = loading.rank_view(committed.manifest(step), state, ranks.rank, ranks.world)
    loading.check_fit(manifest, entries, targets)


def verify(committed: CommittedCheckpoints, step: int | None) -> int:
    """Read every byte of `step` (default: the newest committed, damaged or not) and check every checksum."""
    if step is None:
        steps = committed.steps()  # the newest, damaged or not: that is what is being asked
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint in {committed.loc.url}")
        step = steps[-1]
    manifest = committed.manifest(step)
    per_file = manifest.chunks_by_file()
    for f in manifest.files:
        shardfile.verify_file(committed.loc, step, f, per_file[f.path])
    return step
