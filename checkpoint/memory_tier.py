"""The memory tier: checkpoints in the node's shared memory, outside the worker processes.

A memory checkpoint has the durable format (safetensors shards, manifest, checksums) and is
written and committed by the same code, into a second location: a directory on the node's
tmpfs (`/dev/shm`, where the fsyncs of the commit cost nothing). Under elastic-run the agent
owns that directory for the run (ELASTIC_MEMORY_DIR), so it survives the workers; without an
agent each job gets a private one that close() removes, so it then does not survive the process.

Each node's directory holds only its own ranks' shards; the manifest is written into every
node's directory (checkpoint.commit, NodeRole). Bounded: after a commit a node keeps only that
checkpoint, so at most two exist (the newest and the one being written), plus, with
replication, one of its own per step its copies of other nodes' are of (MemoryRetention).

Replication: the node's leader writes `replicas` into the directory (REPLICATION_FILE); under
elastic-run the agents then copy each node's newest checkpoint into `replicas` peers' memory
(elastic/launcher/replica_pull.py, under REPLICAS_DIR), and restore reads those copies as part
of the memory source, so a node lost whole is restored from a survivor's RAM; the agents also
serve what their node holds to the round's other nodes (PEERS_FILE), so a node lacking files of
a step (a spare, a node added, a survivor of a resize) reads the chunks it needs from them.

Room: at the first save every node checks that its shared memory holds what the tier keeps
there. If one does not, the memory tier is off for the manager's life (one RuntimeWarning with
the numbers, on every rank): memory saves are skipped, durable ones go on, so a job is not
lost to a small /dev/shm.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from checkpoint.collectives import RankGroup
from checkpoint.commit import Committer, NodeRole, SaveJob
from checkpoint.committed import CommittedCheckpoints
from checkpoint.errors import CheckpointError
from checkpoint.io import storage
from checkpoint.io.peer_memory import peer_locations
from checkpoint.prune import drop_old_attempts
from checkpoint.restore import Source
from elastic.exchange import env as names
from elastic.exchange.memory_layout import REPLICAS_DIR, REPLICATION_FILE, pinned_step, replace_file

SHM_ROOT = "/dev/shm"
COPIES = 2  # the newest committed checkpoint and the one being written


@dataclass(frozen=True)
class Placement:
    """This rank's memory directory and its part in it."""

    directory: str
    owned: bool  # a private directory (no agent): removed by close()
    leader: bool  # the lowest rank using the directory: writes the manifest, applies retention
    node_ranks: int  # ranks sharing the directory
    nodes: int  # memory directories in the job


def place(ranks: RankGroup) -> Placement:
    """Where this rank's memory checkpoints go (a collective of `ranks`)."""
    directory = os.environ.get(names.MEMORY_DIR) or None
    owned = directory is None
    if owned:
        if not os.path.isdir(SHM_ROOT):
            raise CheckpointError(f"memory_tier=True needs shared memory at {SHM_ROOT}, which this host "
                                  "lacks; pass memory_tier=False")
        directory = ranks.broadcast(tempfile.mkdtemp(prefix="elastic-ckpt-", dir=SHM_ROOT) if ranks.rank == 0 else None)
    os.makedirs(directory, mode=0o700, exist_ok=True)  # ranks on other hosts: their own copy of the path
    key = [socket.gethostname(), os.path.realpath(directory)]
    keys = ranks.all_gather(key)
    sharing = [rank for rank, k in enumerate(keys) if k == key]
    return Placement(directory, owned, leader=sharing[0] == ranks.rank, node_ranks=len(sharing),
                     nodes=len({tuple(k) for k in keys}))


def room_problem(directory: str, need: int, free: int, copies: int = COPIES) -> str | None:
    """Why `need` bytes of memory checkpoints do not fit in `free` bytes (None: they do)."""
    if need <= free:
        return None
    gib = 1 << 30
    return (f"the checkpoint memory tier needs {need / gib:.2f} GiB of shared memory on this node "
            f"({copies} copies of this node's share), but {directory} has {free / gib:.2f} GiB free; "
            f"enlarge {SHM_ROOT} (docker run --shm-size, or a bigger tmpfs) or pass memory_tier=False")


def free_bytes(directory: str) -> int:
    """Free space where `directory` lives, counting the bytes its own checkpoints hold (replaced
    by the next saves)."""
    stat = os.statvfs(directory)
    held = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)
    return stat.f_bavail * stat.f_frsize + held


class MemoryRetention:
    """After a commit a node keeps only that checkpoint, and its own checkpoints of the steps
    its copies of other nodes' are of: the copies lag the commits, and a restore after such a
    node's loss needs this node's shards of the same step. Uncommitted steps after it are
    kept: another rank of the node may already be writing the next one. So is the step the
    agent pinned (PIN_FILE): its promotion to durable storage runs alongside the next round."""

    def __init__(self, loc: storage.Location, copied_steps: Callable[[], set[int]]) -> None:
        self._loc = loc
        self._copied_steps = copied_steps

    def after_commit(self, committed: int, current_files: set[str]) -> None:
        drop_old_attempts(self._loc, committed, current_files)
        all_committed = set(storage.committed_steps(self._loc))
        kept = (self._copied_steps() & all_committed) | {pinned_step(self._loc.root)}
        for step in storage.step_dirs(self._loc):
            if (step < committed and step not in kept) or (step > committed and step in all_committed):
                storage.delete_step(self._loc, step)


class MemoryTier:
    """The memory tier of one CheckpointManager (its construction is a collective of `ranks`)."""

    def __init__(self, ranks: RankGroup, run_id: str | None, replicas: int) -> None:
        self.placement = place(ranks)
        loc = storage.open_location(self.placement.directory)
        self.committed = CommittedCheckpoints(loc)
        self.committer = Committer(self.committed, MemoryRetention(loc, self._copied_steps), run_id, guard=None,
                                   node=NodeRole(self.placement.leader, self.placement.nodes), tier="memory")
        self.source = Source(self.committed, "memory", node_local=True, copies=self._copies, peers=self._peers)
        # Copies of other nodes' checkpoints held here (the agent's directory only).
        self._replicas = 0 if self.placement.owned else min(replicas, self.placement.nodes - 1)
        if self.placement.leader and not self.placement.owned:  # the agent's directory: tell it
            _write_replicas(self.placement.directory, replicas)
        self._ranks = ranks
        self._room_checked = False
        self.no_room: str | None = None  # why memory saves are skipped (the first save found it)
        # A private directory goes with the manager, also one never closed (at exit at the latest).
        owner = self.placement.owned and self.placement.leader
        self._remove = weakref.finalize(self, shutil.rmtree, self.placement.directory, True) if owner else None

    @classmethod
    def replace(cls, old: MemoryTier | None, ranks: RankGroup, run_id: str | None, replicas: int) -> MemoryTier:
        """The tier placed anew for `ranks` (a collective), `old` closed first."""
        if old is not None:
            old.close()
        return cls(ranks, run_id, replicas)

    def _copies(self) -> list[CommittedCheckpoints]:
        return copies_in(self.placement.directory)

    def _peers(self) -> list[storage.Location]:
        return [] if self.placement.owned else peer_locations(self.placement.directory)

    def _copied_steps(self) -> set[int]:
        return {step for copy in self._copies() for step in copy.steps()}

    def targets(self, durable: Committer, also_durable: bool) -> list[Committer | _UnlessNoRoom]:
        """Where a save commits, in order: memory first (a restore can use it soonest), then
        durable storage if `also_durable`; under the durable guard (round fence) and listener."""
        self.committer.guard = durable.guard
        self.committer.listener = durable.listener
        memory = _UnlessNoRoom(self)
        return [memory, durable] if also_durable else [memory]

    def check_room(self, share: int) -> None:
        """At the first save: unless every node's shared memory holds COPIES of its ranks'
        shares, and 3 more per peer whose copy it holds (the copy, the next one being pulled,
        and its own checkpoint of the copy's step) (`share`: this rank's shard size), turn the
        tier off on every rank with one warning. A collective."""
        if self._room_checked:
            return
        copies = COPIES + 3 * self._replicas
        need = copies * share * self.placement.node_ranks  # ranks' shares are byte-balanced
        problem = room_problem(self.placement.directory, need, free_bytes(self.placement.directory), copies)
        problems = [p for p in self._ranks.all_gather(problem) if p]
        self._room_checked = True
        if problems:  # every rank alike, so the memory commit's collectives are skipped on all
            self.no_room = problems[0]
            warnings.warn(f"{self.no_room}. Memory saves are skipped; durable saves continue.",
                          RuntimeWarning, stacklevel=4)  # the caller of CheckpointManager.save()

    def close(self) -> None:
        """Remove a private directory (its leader; an agent's directory is the agent's)."""
        if self._remove is not None:
            self._remove()


@dataclass(frozen=True)
class _UnlessNoRoom:
    """The memory tier's committer in a save's targets, skipped once the tier found no room."""

    tier: MemoryTier

    def write_and_commit(self, job: SaveJob, copy: Callable[[], None] | None = None, *, notify: bool = True) -> None:
        if self.tier.no_room is None:
            self.tier.committer.write_and_commit(job, copy, notify=notify)
        elif copy is not None:  # still staged: the durable save after it writes the staging
            copy()  # buffer, and an overlapped save's optimizer step waits for the copy


def copies_in(directory: str) -> list[CommittedCheckpoints]:
    """The copies of other nodes' newest checkpoints the agent pulled into the node's memory `directory`."""
    pattern = os.path.join(glob.escape(directory), REPLICAS_DIR, "[!.]*")
    return [CommittedCheckpoints(storage.open_location(d)) for d in sorted(glob.glob(pattern))]


def _write_replicas(directory: str, replicas: int) -> None:
    """How many peers' memory the agents copy this node's checkpoints into (atomically replaced)."""
    replace_file(os.path.join(directory, REPLICATION_FILE), json.dumps({"replicas": replicas}))
