"""Loading a checkpoint on every rank, with the fallback the ranks agree on; verifying one.

Every rank reads, for each tensor, only the chunks that intersect the region it holds,
verifying each chunk as it is read. Ranks agree on the outcome by a gather: if any rank
finds the checkpoint damaged, all fall back together to the next candidate.

The candidates come from one or more sources, newest step first and, for one step, in the
order given (the memory tier before durable storage). A node-local source (each node's
memory holds only its own ranks' shards, plus the copies its agent pulled of its ring
predecessors' newest checkpoints) is read from this node's directories, each file from
whichever holds it; that is how a node lost whole is restored from a survivor's copy. Under
elastic-run the round's other nodes serve theirs (checkpoint/io/peer_memory.py), so a step
committed on any node is offered, and a node lacking files of it (a spare, a node added, a
survivor of a resize) reads the chunks its ranks need from the peers that hold them. Without
peers (no agent, one node) a step is offered only when every rank lists it. A step whose
files are held nowhere in the round falls back.
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
from checkpoint.io.peer_memory import PeerMemoryFileSystem

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
    # (the agent adds them while the job runs), and the round's other nodes' memory.
    copies: Callable[[], list[CommittedCheckpoints]] = list
    peers: Callable[[], list[storage.Location]] = list
    found_corrupt: set[int] = field(default_factory=set)  # by this process's loads: never tried again

    def steps(self) -> list[int]:
        """The committed steps found here (own directory or a copy), ascending."""
        return sorted(set(self.committed.steps()).union(*(c.steps() for c in self.copies())))

    def mark_corrupt(self, step: int) -> None:
        self.found_corrupt.add(step)
        self.committed.mark_corrupt(step)


@dataclass(frozen=True)
class _Spread(storage.Location):
    """A location whose files of one step lie in several places: this node's directories, and
    other nodes' memory."""

    holders: Mapping[str, storage.Location] = field(default_factory=dict)  # file name -> where it is read

    def holder(self, name: str) -> storage.Location:
        return self.holders.get(name, self)

    def path(self, step: int, name: str) -> str:
        held = self.holders.get(name)
        return held.path(step, name) if held is not None else super().path(step, name)

    def peer_bytes(self) -> int:
        """The bytes read so far from other nodes' memory."""
        peers = {id(h.fs): h.fs for h in self.holders.values() if isinstance(h.fs, PeerMemoryFileSystem)}
        return sum(fs.bytes_read for fs in peers.values())


@dataclass(frozen=True)
class Restored:
    """What load() loaded: the step, the tier it came from, and how many of this rank's bytes
    were read from other nodes' memory."""

    step: int
    tier: str
    peer_bytes: int = 0


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
        loaded, error, peer_bytes = _read(source, ranks, state, targets, cand)
        errors = ranks.all_gather(None if error is None else [type(error).__name__, str(error)])
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not bad:
            statedict.apply(state, loaded)
            log.info("checkpoint %s: rank %d loaded step %d (%s tier, %d bytes from other nodes)",
                     url, ranks.rank, cand, source.tier, peer_bytes)
            return Restored(cand, source.tier, peer_bytes)
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
    A shared location is listed by rank 0; a node-local one offers the steps any rank lists
    when every node's are served to the others, else those every rank lists."""
    found: list[tuple[int, int]] = []
    for order, source in enumerate(sources):
        if source.node_local:
            listed = ranks.all_gather((source.steps(), bool(source.peers())))
            served = all(has_peers for _, has_peers in listed)
            steps = set().union(*(s for s, _ in listed)) if served else set(listed[0][0]).intersection(
                *(s for s, _ in listed[1:]))
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
) -> tuple[dict[str, Any] | None, Exception | None, int]:
    """This rank's part of `step`, or the error that stopped reading it; the bytes it read
    from other nodes' memory."""
    loc: storage.Location | None = None
    try:
        if source.node_local:
            whole, loc = _check_whole_here(source, step)
        else:
            whole, loc = source.committed.manifest(step), source.committed.loc
        manifest, entries = loading.rank_view(whole, state, ranks.rank, ranks.world)
        loading.check_fit(manifest, entries, targets)
        loaded, error = loading.read_state(loc, manifest, entries, targets), None
    except (CheckpointError, OSError) as exc:  # every rank must reach the agreement that follows
        loaded, error = None, exc
    return loaded, error, loc.peer_bytes() if isinstance(loc, _Spread) else 0


def _check_whole_here(source: Source, step: int) -> tuple[Manifest, storage.Location]:
    """A node-local step is read from this node's directories (its own, its copies of other
    nodes') and, for the files none of them holds, from the round's other nodes that hold them
    (the sizes as listed; the checksums are checked as it is read). Returns the manifest and
    where each file is read from."""
    own = source.committed
    if step in source.found_corrupt:
        raise CheckpointNotFoundError(f"{source.tier} checkpoint step {step} in {own.loc.url}: found corrupt "
                                      "while loading")
    holders = [c for c in [own, *source.copies()] if step in c.steps()]
    if holders and holders[0] is own and own.damage(own.manifest(step)) is None:
        return own.manifest(step), own.loc  # the usual case: one node, or no node lost
    if not holders or held_here(holders, step)[2]:  # not whole on this node: add the peers holding it
        holders += _peers_holding(source, step)
    if not holders:
        raise CheckpointNotFoundError(f"{source.tier} checkpoint step {step} is held neither in {own.loc.url} "
                                      "nor in the round's other nodes' memory")
    manifest, loc, missing = held_here(holders, step)
    if missing:
        raise CheckpointNotFoundError(
            f"{source.tier} checkpoint step {step} in {own.loc.url} is not whole in the round: "
            f"{', '.join(missing)} held neither on this node nor by any other node of the round "
            f"({', '.join(h.loc.url for h in holders)})"
        )
    return manifest, loc


def _peers_holding(source: Source, step: int) -> list[CommittedCheckpoints]:
    """The round's other nodes' memory holding `step` (one that cannot be asked holds nothing)."""
    holding = []
    for loc in source.peers():
        peer = CommittedCheckpoints(loc)
        try:
            if step in peer.steps():
                holding.append(peer)
        except CheckpointError as exc:  # the listing failed (storage wraps the OSError)
            log.warning("checkpoint: cannot list %s: %s", loc.url, exc)
    return holding


def held_here(holders: Sequence[CommittedCheckpoints], step: int) -> tuple[Manifest, storage.Location, list[str]]:
    """Committed `step` as `holders` (a node's own directory, its copies of other nodes', other
    nodes' memory; each holding the step) hold it: the manifest, a location reading each file
    it names from the first holder that has it at its listed size, and the files none has."""
    manifest = holders[0].manifest(step)
    found: dict[str, storage.Location] = {}
    for holder in holders:
        sizes = storage.file_sizes(holder.loc, step)
        found.update({f.path: holder.loc for f in manifest.files if f.path not in found and sizes.get(f.path) == f.size})
    missing = [f.path for f in manifest.files if f.path not in found]
    own = holders[0].loc
    return manifest, _Spread(own.fs, own.root, own.url, found), missing


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
