"""The committed checkpoints of one location: their steps, their manifests, which are damaged.

A committed checkpoint is damaged when a listing shows a shard missing or of the wrong size,
or when this manager's load() found it corrupt. A damaged checkpoint is never a resume point.

Manifests are kept once read: a committed manifest never changes. One is forgotten when its
step is deleted or committed again (a save of a step already saved), or no longer listed.
"""

from __future__ import annotations

from checkpoint.errors import CheckpointCorruptError, CheckpointNotFoundError
from checkpoint.format.manifest import MANIFEST_NAME, Manifest
from checkpoint.io import storage


class CommittedCheckpoints:
    """What storage shows committed at `loc`, plus the steps load() found corrupt."""

    def __init__(self, loc: storage.Location) -> None:
        self.loc = loc
        # Steps whose load failed on a checksum or a missing/short file: never a resume point.
        self._found_corrupt: set[int] = set()
        self._manifests: dict[int, Manifest] = {}

    def remember(self, manifest: Manifest) -> None:
        """`manifest` was just committed (by this process): no need to read it back."""
        self._manifests[manifest.step] = manifest

    def forget(self, step: int) -> None:
        """`step` was deleted or committed again: its manifest must be read anew."""
        self._manifests.pop(step, None)

    def mark_corrupt(self, step: int) -> None:
        self._found_corrupt.add(step)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        steps = storage.committed_steps(self.loc)
        for gone in set(self._manifests).difference(steps):  # deleted by another process
            self._manifests.pop(gone, None)
        return steps

    def manifest(self, step: int) -> Manifest:
        """The validated manifest of committed `step`."""
        if step in self._manifests:
            return self._manifests[step]
        path = self.loc.path(step, MANIFEST_NAME)
        try:
            text = storage.read_bytes(self.loc, path)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step}: {path} does not exist. "
                f"Committed steps: {self.steps()}"
            ) from exc
        manifest = Manifest.from_json(text, where=path)
        if manifest.step != step:
            raise CheckpointCorruptError(f"{path}: records step {manifest.step}, expected {step}")
        self._manifests[step] = manifest
        return manifest

    def damage(self, manifest: Manifest) -> str | None:
        """Why committed `manifest.step` cannot be a resume point, by a cheap check (None: looks whole)."""
        if manifest.step in self._found_corrupt:
            return "found corrupt while loading"
        problems = manifest.listing_problems(storage.file_sizes(self.loc, manifest.step))
        return "; ".join(problems) if problems else None

    def latest(self) -> int | None:
        """The newest committed step that looks loadable (see damage()), or None."""
        for step in reversed(self.steps()):
            try:
                manifest = self.manifest(step)
            except (CheckpointCorruptError, CheckpointNotFoundError):
                continue
            if self.damage(manifest) is None:
                return step
        return None
