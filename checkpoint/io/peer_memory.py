"""Another node's memory checkpoints as an fsspec filesystem, read over its agent's HTTP server.

Under elastic-run each agent serves what its node holds in memory (its own checkpoints and
its copies of other nodes': elastic/launcher/replica_server.py) and writes, before its
workers start, where the round's other nodes serve theirs (PEERS_FILE in the node's memory
directory). A restore on a node that lacks files of a step (a spare that replaced a lost
node, a node added by growth, a survivor of a resize) reads them from a peer through this
filesystem: the listing of what the peer holds once per instance (one load), and each chunk
with one Range request on a kept-alive connection per thread, so only the bytes this node's
ranks need cross the network. Every chunk is then checked against its manifest checksum as
any other read is.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from fsspec import AbstractFileSystem

from checkpoint.io import storage
from elastic.exchange.memory_layout import HELD_PATH, HTTP_TIMEOUT, PEERS_FILE, STEP_DIR, TOKEN_HEADER

T = TypeVar("T")


class PeerMemoryFileSystem(AbstractFileSystem):
    """The committed steps one peer node holds in memory, read-only; paths are the peer's URL
    followed by /step_<N>/<name>."""

    cachable = False  # one instance per load: its listing is a snapshot
    protocol = "elastic-peer"

    def __init__(self, url: str, token: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url.rstrip("/")
        self._token = token
        self._held: dict[int, dict[str, int]] | None = None
        self._local = threading.local()  # one connection per reading thread
        self._conns: list[http.client.HTTPConnection] = []  # all of them: closed with the instance
        weakref.finalize(self, _close_all, self._conns)
        self.bytes_read = 0  # shard bytes this instance fetched (a restore reports them)
        self._lock = threading.Lock()

    def held(self) -> dict[int, dict[str, int]]:
        """Step -> {file name: size} of every committed step the peer holds (asked once)."""
        if self._held is None:
            body = self._get(HELD_PATH, lambda resp: resp.read())
            self._held = {int(step): {str(n): int(size) for n, size in files.items()}
                          for step, files in json.loads(body)["steps"].items()}
        return self._held

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        rel = self._relative(path)
        if rel == "":
            entries = [{"name": f"{self.url}/step_{s:012d}", "type": "directory", "size": 0} for s in self.held()]
        else:
            match = STEP_DIR.match(rel)
            files = self.held().get(int(match.group(1))) if match else None
            if files is None:
                raise FileNotFoundError(path)
            entries = [{"name": f"{self.url}/{rel}/{n}", "type": "file", "size": size} for n, size in files.items()]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        rel = self._relative(path)
        if rel == "":
            return {"name": self.url, "type": "directory", "size": 0}
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        for entry in self.ls(f"{self.url}/{parent}" if parent else self.url):
            if entry["name"] == f"{self.url}/{rel}":
                return entry
        raise FileNotFoundError(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The file's bytes [start, end) (all of it when both are None)."""
        if start is None and end is None:
            return self._get("/" + self._relative(path), lambda resp: resp.read())
        out = bytearray(end - (start or 0))
        got = self.read_range_into(path, start or 0, memoryview(out))
        return bytes(out[:got])

    def read_range_into(self, path: str, start: int, out: memoryview) -> int:
        """Read the file's bytes from `start` straight into `out` (a chunk's destination, so no
        intermediate buffer); returns how many came."""
        if not len(out):
            return 0  # an empty chunk: HTTP has no empty range
        got = self._get("/" + self._relative(path), lambda resp: _read_into(resp, out),
                        {"Range": f"bytes={start}-{start + len(out) - 1}"})
        with self._lock:
            self.bytes_read += got
        return got

    def _relative(self, path: str) -> str:
        if not path.startswith(self.url):
            raise FileNotFoundError(f"{path}: not on {self.url}")
        return path[len(self.url):].strip("/")

    def _get(self, path: str, body: Callable[[http.client.HTTPResponse], T], headers: dict[str, str] | None = None) -> T:
        """One GET on this thread's connection (opened again once if the peer closed it), its
        response read by `body`. A peer that cannot be reached holds nothing any more
        (FileNotFoundError): its node is gone."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("GET", path, headers={TOKEN_HEADER: self._token, **(headers or {})})
                resp = conn.getresponse()
                result = body(resp) if resp.status in (200, 206) else resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                closed = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if closed and not attempt:  # a kept-alive connection the server closed meanwhile
                    continue
                raise FileNotFoundError(f"{self.url}{path}: the node cannot be reached ({exc})") from exc
            if resp.status == 404:
                raise FileNotFoundError(f"{self.url}{path}: {resp.reason}")
            if resp.status not in (200, 206):
                raise OSError(f"{self.url}{path}: HTTP {resp.status} {resp.reason}")
            return result
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            parsed = urllib.parse.urlsplit(self.url)
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=HTTP_TIMEOUT)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn


def _read_into(resp: http.client.HTTPResponse, out: memoryview) -> int:
    """The response's body into `out` (as long as `out`, or shorter at its end)."""
    got = 0
    while got < len(out):
        n = resp.readinto(out[got:])
        if not n:
            break
        got += n
    resp.read()  # whatever is left (nothing, when the peer answered the range asked), for the next request
    return got


def _close_all(conns: list[http.client.HTTPConnection]) -> None:
    for conn in conns:
        conn.close()


def peer_locations(directory: str) -> list[storage.Location]:
    """The round's other nodes' memory, as the agent of the node whose memory `directory` is
    listed it for this round (none: no agent, or a job of one node)."""
    try:
        with open(os.path.join(directory, PEERS_FILE)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return []
    return [storage.Location(PeerMemoryFileSystem(url, record["token"]), url, f"{url} (node {node}'s memory)")
            for node, url in sorted(record["peers"].items())]
