"""The node's shared-memory directory for the checkpoint memory tier, owned by the agent.

The agent creates it for the run (workers find it in ELASTIC_MEMORY_DIR), so the memory
checkpoints outlive the workers, and removes it when it exits. After a worker failure it
saves at breakpoint: ``python -m checkpoint.promote`` (a subprocess: the launcher imports
neither checkpoint nor torch) copies the newest memory checkpoint to --checkpoint-dir when it
is newer than the newest durable one, while the next round starts and runs: the agent pins
the step (PIN_FILE, so that the next round's memory retention and the replica puller keep
it), asks, goes on to the rendezvous, and takes the answer in its watch loop; at exit it
waits for it. That process is started once the workers use the memory tier (REPLICATION_FILE
appears) and completed their first step, and kept on standby for the agent's life
(promotion_standby.py), so a failure does not wait for its imports, and an agent whose
workers do not use the tier starts none; when a local --checkpoint-dir already holds the
newest memory step, the agent does not ask it at all.

Replication (with more than one node): the agent serves its own memory checkpoints to its
peers (replica_server.py; the port is in its rendezvous registration) and copies its ring
predecessors' newest ones into REPLICAS_DIR (replica_pull.py), where a restore finds them;
before each round's workers start it tells them (PEERS_FILE) where the round's other nodes
serve theirs, so a restore on a node lacking some files (a spare, a node added, a survivor of
a resize) reads those chunks from the peers that hold them.

An agent killed with SIGKILL cannot remove its directory; it leaves its pid in it
(OWNER_FILE), and the next agent to start on the host removes the directories whose agent is gone.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from elastic.exchange.memory_layout import MANIFEST, PEERS_FILE, PIN_FILE, REPLICATION_FILE, STEP_DIR, replace_file
from elastic.launcher.hang_watch import ProgressWatch
from elastic.launcher.pool_refill import under_way
from elastic.launcher.promotion_standby import PromotionStandby
from elastic.launcher.replica_pull import Peer, Pulled, ReplicaPuller, ring_predecessors
from elastic.launcher.replica_server import ReplicaServer, held

if TYPE_CHECKING:  # events imports worker_group, which imports path() from here
    from elastic.launcher.config import LaunchConfig
    from elastic.launcher.events import EventLog

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
OWNER_FILE = ".agent-pid"


def path(run_id: str, node_id: str) -> str | None:
    """The node's memory directory for the run; None where the host has no shared memory."""
    if not os.path.isdir(SHM_ROOT):
        return None
    return os.path.join(SHM_ROOT, "elastic-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_id}-{node_id}"))


def newest_local_durable(url: str) -> int | None:
    """The newest committed step in --checkpoint-dir `url` when it is a local directory (None:
    none, or not local: then checkpoint.promote finds out)."""
    if "://" in url and not url.startswith("file://"):
        return None
    root = url.removeprefix("file://")
    steps = [STEP_DIR.match(os.path.basename(os.path.dirname(p)))
             for p in glob.glob(os.path.join(glob.escape(root), "step_*", MANIFEST))]
    return max((int(m.group(1)) for m in steps if m), default=None)


def remove_orphans() -> None:
    """Remove the memory directories (of this user) whose agent is no longer running."""
    for owner in glob.glob(os.path.join(SHM_ROOT, "elastic-*", OWNER_FILE)):
        try:
            with open(owner) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.dirname(owner), ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (another user's, or being written)


class MemoryDir:
    """Create (now), save at breakpoint, remove."""

    def __init__(self, config: LaunchConfig, node_id: str, events: EventLog) -> None:
        self._config = config
        self._events = events
        self._node_id = node_id
        self.path = path(config.run_id, node_id)
        self._server: ReplicaServer | None = None
        self._puller: ReplicaPuller | None = None
        self._secret = ""  # the run's, for the peers' servers (once serve() asked for it)
        self._standby: PromotionStandby | None = None
        self._asked: tuple[int, float] | None = None  # the round and time of the promotion in flight
        self._queued: int | None = None  # the round of a newer failure, asked for once it answers
        if self.path is not None:
            remove_orphans()
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            with open(os.path.join(self.path, OWNER_FILE), "w") as f:
                f.write(str(os.getpid()))

    def serve(self, addr: str, token: Callable[[], str]) -> int:
        """Start replication: serve this node's memory checkpoints on `addr` and pull the peers'
        that follow() names, both with the run's shared secret `token()` (asked only if needed).
        Returns the port (0: no replication: no shared memory, or one node)."""
        if self.path is None or self._config.max_nodes < 2:
            return 0
        self._secret = token()
        self._server = ReplicaServer(addr, self.path, self._secret)
        self._puller = ReplicaPuller(self.path, self._pulled, self._secret)
        return self._server.port

    def follow(self, ring: tuple[str, ...], endpoints: dict[str, tuple[str, int]]) -> None:
        """A round was sealed, its workers not started: tell them where the round's other nodes
        serve their memory (PEERS_FILE), and copy from this node's predecessors in `ring` (its
        members in rank order), found at `endpoints` (node -> the address and port its agent
        serves on)."""
        if self._puller is None:
            return
        peers = {n: Peer(n, *endpoints[n]) for n in ring if n in endpoints and n != self._node_id}
        replace_file(os.path.join(self.path, PEERS_FILE),
                     json.dumps({"token": self._secret, "peers": {n: p.url("") for n, p in peers.items()}}))
        self._puller.follow([peers[n] for n in ring_predecessors(ring, self._node_id) if n in peers])

    def prepare(self, progress: ProgressWatch, round_started: float) -> None:
        """While workers run (called every watch): take the answer of a promotion in flight; once
        the round is under way (as for the warm pool: its imports would slow the workers'),
        keep the promotion process on standby if they use the memory tier (one that died is
        replaced)."""
        if self._asked is not None:
            self._take_answer(wait=False)
        if self._standby is not None:
            self._standby.ensure()
        elif (self._config.checkpoint_dir and under_way(progress, round_started)
              and os.path.exists(os.path.join(self.path or "", REPLICATION_FILE))):
            self._standby = PromotionStandby(self.path, self._config.checkpoint_dir)

    def save_at_breakpoint(self, round_: int) -> None:
        """After a failure: ask for the promotion of the newest memory checkpoint to durable
        storage, if any, without waiting (prepare() and remove() take the answer). While one
        is in flight a newer failure's is queued: asked for once it answers."""
        if self._asked is not None:
            self._queued = round_
            return
        newest = max(held(self.path), default=None) if self.path is not None and self._config.checkpoint_dir else None
        if newest is None:
            return  # nothing committed in memory: nothing to ask
        durable = newest_local_durable(self._config.checkpoint_dir)
        if durable is not None and durable >= newest:  # the usual case after a durable save: no round trip
            self._events.emit("memory_checkpoint_not_promoted", round=round_, seconds=0.0,
                              reason=f"durable step {durable} is not older than memory step {newest}")
            return
        if self._standby is None:  # e.g. a failure before the round got under way: started only now
            self._standby = PromotionStandby(self.path, self._config.checkpoint_dir)
        replace_file(os.path.join(self.path, PIN_FILE), str(newest))
        self._asked = (round_, time.monotonic())
        self._standby.ask(newest)

    def _take_answer(self, wait: bool) -> None:
        """Log the outcome of the promotion in flight, if it answered (`wait`: until it does)."""
        outcome = self._standby.answer(wait)
        if outcome is None:
            return
        (round_, started), self._asked = self._asked, None
        os.remove(os.path.join(self.path, PIN_FILE))
        seconds = round(time.monotonic() - started, 3)  # from the ask: the next round ran meanwhile
        if outcome.get("step") is not None:
            self._events.emit("memory_checkpoint_promoted", round=round_, step=outcome["step"],
                              url=self._config.checkpoint_dir, seconds=seconds,
                              promote_seconds=round(outcome["seconds"], 3), bytes=outcome["copied_bytes"])
            log.warning("elastic-run: saved at breakpoint: memory checkpoint of step %d written to %s",
                        outcome["step"], self._config.checkpoint_dir)
        else:
            why = outcome.get("error") or outcome.get("reason")
            self._events.emit("memory_checkpoint_not_promoted", round=round_, reason=why, seconds=seconds)
            if outcome.get("error"):
                log.warning("elastic-run: the memory checkpoint could not be saved at breakpoint: %s", why)
        if self._queued is not None:
            queued, self._queued = self._queued, None
            self.save_at_breakpoint(queued)

    def remove(self) -> None:
        """At exit: the promotions asked for waited for (a job that gives up loses nothing),
        replication stopped, the standby process told to exit (EOF), the directory removed."""
        while self._asked is not None:
            self._take_answer(wait=True)
        if self._puller is not None:
            self._puller.close()
            self._server.close()
            self._puller = self._server = None
        if self._standby is not None:
            self._standby.close()
            self._standby = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def _pulled(self, pulled: Pulled) -> None:
        self._events.emit("memory_replica_pulled", peer=pulled.peer, step=pulled.step, bytes=pulled.bytes,
                          seconds=pulled.seconds)
