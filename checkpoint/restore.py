"""Loading a checkpoint on every rank, with the fallback the ranks agree on; verifying one.

Every rank reads, for each tensor, only the chunks that intersect the region it holds,
verifying each chunk as it is read. Ranks agree on the outcome by a gather: if any rank
finds the checkpoint damaged, all fall back together to the next candidate.

The candidates come from one or more sources, newest step first and, for one step, in the
order given (the memory tier before durable storage). A node-local source (each node's
memory holds only its own ranks' shards) offers a step only when every rank lists it, and
is read only when this node holds every file its manifest names: shards held by other
nodes' memory are not fetched (peer reads are not built yet), so such a step falls back.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
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
from checkpoint.io import loading, shardfile

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
            source.committed.mark_corrupt(cand)
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
            listed = ranks.all_gather(source.committed.steps())
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
    committed = source.committed
    try:
        whole = committed.manifest(step)
        if source.node_local:
            _check_whole_here(source, whole)
        manifest, entries = loading.rank_view(whole, state, ranks.rank, ranks.world)
        loading.check_fit(manifest, entries, targets)
        return loading.read_state(committed.loc, manifest, entries, targets), None
    except (CheckpointError, OSError) as exc:  # every rank must reach the agreement that follows
        return None, exc


def _check_whole_here(source: Source, manifest: Any) -> None:
    """A node-local step is read only when this node holds every file its manifest names;
    reading the other nodes' shards from their memory is not built yet, so it falls back."""
    damage = source.committed.damage(manifest)
    if damage is not None:
        raise CheckpointNotFoundError(
            f"{source.tier} checkpoint step {manifest.step} in {source.committed.loc.url} is not whole on "
            f"this node ({damage}); shards held by other nodes are not fetched from their memory"
        )


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
