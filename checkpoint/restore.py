"""Loading a checkpoint on every rank, with the fallback the ranks agree on; verifying one.

Every rank reads, for each tensor, only the chunks that intersect the region it holds,
verifying each chunk as it is read. Ranks agree on the outcome by a gather: if any rank
finds the checkpoint damaged, all fall back together to the previous committed one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, MutableMapping
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


def load(
    committed: CommittedCheckpoints, ranks: RankGroup, state: MutableMapping[str, Any], step: int | None
) -> int | None:
    """Load `step` (default: the newest that loads) into `state` on every rank; the step loaded.

    A collective. Only a checkpoint found damaged or vanished falls back to an older one,
    and only when `step` is None.
    """
    url = committed.loc.url
    candidates = _candidates(committed, ranks, step)
    if not candidates:
        return None
    _, targets, _ = statedict.flatten_state(state, ranks.rank)
    failures = []
    for cand in candidates:
        loaded, error = _read(committed, ranks, state, targets, cand)
        errors = ranks.all_gather(None if error is None else [type(error).__name__, str(error)])
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not bad:
            statedict.apply(state, loaded)
            log.info("checkpoint %s: rank %d loaded step %d", url, ranks.rank, cand)
            return cand
        rank, (kind, message) = bad[0]
        reason = f"rank {rank}: {message}"
        if error is None:
            error = _ERRORS_BY_NAME.get(kind, CheckpointError)(reason)
        # Only a damaged or vanished checkpoint is a reason to try an older one; a model
        # that does not fit or a storage outage would fail on the older one too.
        damaged = all(e[0] in ("CheckpointCorruptError", "CheckpointNotFoundError") for _, e in bad)
        if damaged:
            committed.mark_corrupt(cand)
        if step is not None or not damaged:
            raise error
        failures.append(f"step {cand}: {reason}")
        warnings.warn(
            f"checkpoint step {cand} in {url} cannot be loaded ({reason}); "
            "falling back to the previous committed checkpoint",
            RuntimeWarning,
            stacklevel=3,  # the caller of CheckpointManager.load()
        )
    raise CheckpointCorruptError(f"no committed checkpoint in {url} could be loaded: " + "; ".join(failures))


def _candidates(committed: CommittedCheckpoints, ranks: RankGroup, step: int | None) -> list[int]:
    """The steps to try, newest first, as rank 0 lists them."""
    candidates = ranks.broadcast(sorted(committed.steps(), reverse=True) if ranks.rank == 0 else None)
    if step is None:
        return candidates
    if step not in candidates:
        raise CheckpointNotFoundError(
            f"no committed checkpoint for step {step} in {committed.loc.url}; committed: {sorted(candidates)}"
        )
    return [step]


def _read(
    committed: CommittedCheckpoints,
    ranks: RankGroup,
    state: Mapping[str, Any],
    targets: Mapping[str, torch.Tensor],
    step: int,
) -> tuple[dict[str, Any] | None, Exception | None]:
    """This rank's part of `step`, or the error that stopped reading it."""
    try:
        manifest, entries = loading.rank_view(committed.manifest(step), state, ranks.rank, ranks.world)
        loading.check_fit(manifest, entries, targets)
        return loading.read_state(committed.loc, manifest, entries, targets), None
    except (CheckpointError, OSError) as exc:  # every rank must reach the agreement that follows
        return None, exc


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
