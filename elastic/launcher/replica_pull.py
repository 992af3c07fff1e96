"""Copies the newest memory checkpoint of this node's ring predecessors into its own memory.

With `replicas=k` (REPLICATION_FILE, written by the workers' memory tier; absent: nothing is
pulled) node i of the sealed round's ring holds copies of nodes i-1..i-k, so a node lost
whole still has every shard in some survivor's RAM. A daemon thread of the agent asks each
followed peer's ReplicaServer for its newest committed step every POLL_EVERY seconds and, when
it is newer than the copy held, pulls its files (the manifest last) into a temporary
directory, renames it to <memory dir>/replicas/<peer>/step_<N> and deletes the older copy:
a partial pull is never seen as committed, and at most one copy per peer is kept. Training
never waits for it. A copy of a peer no longer followed (it left the ring) is kept until this
node commits a newer step of its own, since it is what a restore after that peer's loss needs.

A node that lacks files of the step a round restores (a spare replacing a lost node, a node
added by growth, a survivor of a resize) copies nothing here: its workers read the chunks
they need from the peers' servers as they restore (checkpoint/io/peer_memory.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse

from elastic.exchange.memory_layout import (HTTP_TIMEOUT, MANIFEST, REPLICAS_DIR, REPLICATION_FILE, STEP_DIR,
                                            TOKEN_HEADER, peer_dir_name, pinned_step)
from elastic.launcher.replica_server import newest_step

log = logging.getLogger(__name__)

POLL_EVERY = 0.2  # seconds between asks for each followed peer's newest step (one small request)
_BUFFER = 8 << 20  # bytes copied per read of a pulled file


@dataclass(frozen=True)
class Peer:
    """A node whose memory this node copies, and where its agent serves it."""

    node_id: str
    addr: str
    port: int

    def url(self, path: str) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}{path}"


@dataclass(frozen=True)
class Pulled:
    """One copy made: whose, which step, how many bytes, how long it took."""

    peer: str
    step: int
    bytes: int
    seconds: float


def ring_predecessors(ring: Sequence[str], node_id: str) -> list[str]:
    """The other nodes of `ring` (the sealed round's members in rank order), nearest
    predecessor first: node i's are i-1, i-2, ... wrapping around."""
    if node_id not in ring:
        return []
    i = ring.index(node_id)
    return [ring[(i - d) % len(ring)] for d in range(1, len(ring))]


def replicas_wanted(directory: str) -> int:
    """How many peers should hold a copy of each node's newest memory checkpoint (0: none yet)."""
    try:
        with open(os.path.join(directory, REPLICATION_FILE)) as f:
            return int(json.load(f)["replicas"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def held_step(peer_dir: str) -> int | None:
    """The step of the copy held in `peer_dir` (None: none)."""
    return newest_step(peer_dir)[0]


class ReplicaPuller:
    """The pulling thread over this node's memory `directory`; `on_pulled` hears of each copy;
    `token`: the run's shared secret the peers' servers ask for."""

    def __init__(self, directory: str, on_pulled: Callable[[Pulled], None], token: str,
                 every: float = POLL_EVERY) -> None:
        self._dir = directory
        self._token = token
        self._root = os.path.join(directory, REPLICAS_DIR)
        self._on_pulled = on_pulled
        self._every = every
        self._buffer = memoryview(bytearray(_BUFFER))  # the thread's alone: allocated once
        self._peers: tuple[Peer, ...] = ()  # nearest predecessor first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-pull", daemon=True)
        self._thread.start()

    def follow(self, peers: Sequence[Peer]) -> None:
        """The ring predecessors of the round just sealed, nearest first (the first k are copied)."""
        self._peers = tuple(peers)  # one reference swap: the thread reads it once per pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            followed = self._peers[:replicas_wanted(self._dir)]
            for peer in followed:
                try:
                    self._pull_newest(peer)
                except (OSError, ValueError, KeyError, HTTPException) as exc:  # a peer gone or restarting
                    log.debug("replica pull from %s failed: %s", peer.node_id, exc)
            self._drop_stale({peer_dir_name(p.node_id) for p in followed})

    def _pull_newest(self, peer: Peer) -> None:
        newest = self._get_json(peer, "/newest")
        step, files = newest["step"], newest["files"]
        held = held_step(os.path.join(self._root, peer_dir_name(peer.node_id)))
        if step is None or (held is not None and step <= held):
            return
        self._on_pulled(self._copy(peer, step, files))

    def _copy(self, peer: Peer, step: int, files: dict[str, int]) -> Pulled:
        """`files` of `step` from `peer` into its copy directory, replacing an older copy."""
        started = time.monotonic()
        peer_dir = os.path.join(self._root, peer_dir_name(peer.node_id))
        name = f"step_{step:012d}"
        tmp = os.path.join(self._root, f".pull-{uuid.uuid4().hex}")
        os.makedirs(os.path.join(tmp, name), mode=0o700)
        try:
            for file in sorted(files, key=lambda f: f == MANIFEST):  # the manifest last
                self._pull_file(peer, f"/{name}/{file}", os.path.join(tmp, name, file), files[file])
            os.makedirs(peer_dir, mode=0o700, exist_ok=True)
            os.rename(os.path.join(tmp, name), os.path.join(peer_dir, name))  # the copy appears whole
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pinned = pinned_step(self._dir)  # kept too: its promotion may be copying it
        keep = {name} if pinned is None else {name, f"step_{pinned:012d}"}
        for old in os.listdir(peer_dir):
            if old not in keep and STEP_DIR.match(old):
                shutil.rmtree(os.path.join(peer_dir, old), ignore_errors=True)
        return Pulled(peer.node_id, step, sum(files.values()), round(time.monotonic() - started, 3))

    def _pull_file(self, peer: Peer, path: str, dest: str, size: int) -> None:
        with self._open(peer, path) as resp, open(dest, "wb") as out:
            while n := resp.readinto(self._buffer):  # no new bytes object per block
                out.write(self._buffer[:n])
            got = out.tell()
        if got != size:
            raise ValueError(f"{peer.url(path)}: got {got} bytes, {size} were listed")

    def _drop_stale(self, followed: set[str]) -> None:
        """Copies of peers no longer followed, once this node has committed a newer step."""
        own = newest_step(self._dir)[0]
        if own is None:
            return
        for peer_dir in glob.glob(os.path.join(glob.escape(self._root), "[!.]*")):
            held = held_step(peer_dir)
            pinned = pinned_step(self._dir)
            if pinned is not None and os.path.isdir(os.path.join(peer_dir, f"step_{pinned:012d}")):
                continue  # its promotion may be copying it
            if os.path.basename(peer_dir) not in followed and (held is None or held < own):
                shutil.rmtree(peer_dir, ignore_errors=True)

    def _open(self, peer: Peer, path: str) -> HTTPResponse:
        request = urllib.request.Request(peer.url(path), headers={TOKEN_HEADER: self._token})
        return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)

    def _get_json(self, peer: Peer, path: str) -> dict:
        with self._open(peer, path) as resp:
            return json.load(resp)
