"""Serves this node's memory checkpoints to its peers' agents and to the round's workers, read-only.

A thread of the agent runs a small HTTP/1.1 server (connections kept alive) on the node's
address (advertised in its rendezvous registration, Member.replica_port). Every request must
carry the run's shared secret (TOKEN_HEADER: the value the agents agree on through the
rendezvous, created once per run: EtcdRendezvous.replica_token), compared in constant time;
any other gets 403. Three requests, nothing else:

    GET /newest                 -> {"step": N or null, "files": {name: size}} of the newest
                                   committed step of this node's own memory directory (what
                                   its ring successors copy)
    GET /held                   -> {"steps": {N: {name: size}}}: every committed step this
                                   node holds in its own directory or its copies of other
                                   nodes' (REPLICAS_DIR), with their files (what a restore on
                                   a node lacking some of them reads from)
    GET /step_<12 digits>/<name> -> that file's bytes (a plain name inside a step directory),
                                   from the own directory, else from a copy; with
                                   `Range: bytes=A-B`, those bytes only (206): one chunk

Nothing outside the step directories is served. The bytes are checked by the checksums of
the manifest when a worker restores from them, so the transfer needs none of its own.
The traffic is not encrypted (the secret and the weights cross the network in clear): keep
nodes on a private network, as for their workers' process-group ports.
"""

from __future__ import annotations

import glob
import hmac
import json
import logging
import os
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elastic.exchange.memory_layout import HELD_PATH, MANIFEST, REPLICAS_DIR, STEP_DIR, TOKEN_HEADER

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")  # the one form a restore asks for: a chunk
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def committed(directory: str) -> dict[int, dict[str, int]]:
    """The committed steps in `directory` and their files' sizes."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(directory), "step_*", MANIFEST)):
        match = STEP_DIR.match(os.path.basename(os.path.dirname(path)))
        try:
            files = {e.name: e.stat().st_size for e in os.scandir(os.path.dirname(path))
                     if e.is_file() and not e.name.startswith(".")}
        except FileNotFoundError:
            continue  # deleted by retention since the glob
        if match and MANIFEST in files:
            found[int(match.group(1))] = files
    return found


def newest_step(directory: str) -> tuple[int | None, dict[str, int]]:
    """The newest committed step in `directory` and its files' sizes (None, {}: none)."""
    found = committed(directory)
    return (max(found), found[max(found)]) if found else (None, {})


def held_dirs(directory: str) -> list[str]:
    """This node's own memory directory, then its copies of other nodes'."""
    copies = glob.glob(os.path.join(glob.escape(directory), REPLICAS_DIR, "[!.]*"))
    return [directory, *sorted(copies)]


def held(directory: str) -> dict[int, dict[str, int]]:
    """Every committed step in `directory` or its copies, with the files of all that hold it."""
    steps: dict[int, dict[str, int]] = {}
    for d in held_dirs(directory):
        for step, files in committed(d).items():
            merged = steps.setdefault(step, {})
            merged.update({n: size for n, size in files.items() if n not in merged})
    return steps


class ReplicaServer:
    """The HTTP server over `directory`, in a daemon thread, on (addr, an ephemeral port), for
    requests carrying `token`."""

    def __init__(self, addr: str, directory: str, token: str) -> None:
        if not token:
            raise ValueError("the replica server needs the run's shared secret (an empty token would admit anyone)")
        handler = type("Handler", (_Handler,), {"directory": directory, "token": token.encode()})
        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET, "daemon_threads": True})
        self._server = server_class((addr, 0), handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="replica-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a restore asks one connection for many chunks
    directory = ""  # set per server
    token = b""

    def do_GET(self) -> None:
        parts = self.path.split("/")
        given = (self.headers.get(TOKEN_HEADER) or "").encode()
        if not hmac.compare_digest(given, self.token):
            self.send_error(HTTPStatus.FORBIDDEN, f"a request without the run's replica token ({TOKEN_HEADER})")
        elif self.path == "/newest":
            step, files = newest_step(self.directory)
            self._send(json.dumps({"step": step, "files": files}).encode(), "application/json")
        elif self.path == HELD_PATH:
            self._send(json.dumps({"steps": held(self.directory)}).encode(), "application/json")
        elif len(parts) == 3 and STEP_DIR.match(parts[1]) and _plain(parts[2]):
            paths = [os.path.join(d, parts[1], parts[2]) for d in held_dirs(self.directory)]
            self._send_file(next((p for p in paths if os.path.isfile(p)), paths[0]))
        else:
            self.send_error(HTTPStatus.NOT_FOUND, f"only /newest, {HELD_PATH} and /step_<N>/<file> are served")

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, path: str) -> None:
        try:
            f = open(path, "rb")  # once open, retention deleting the file does not cut the transfer
        except FileNotFoundError:
            self.send_error(HTTPStatus.NOT_FOUND, "no such file (the step may have been replaced)")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            begin, count = 0, size
            wanted = self.headers.get("Range")
            if wanted is not None:
                match = _RANGE.match(wanted)
                if match is None or int(match.group(1)) > int(match.group(2)) or int(match.group(2)) >= size:
                    self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"{wanted!r} of {size} bytes")
                    return
                begin, count = int(match.group(1)), int(match.group(2)) - int(match.group(1)) + 1
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {begin}-{begin + count - 1}/{size}")
            else:
                self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(count))
            self.end_headers()
            try:
                self.wfile.flush()
                self.connection.sendfile(f, begin, count)  # the kernel copies: no buffer here
            except (BrokenPipeError, ConnectionResetError):
                log.debug("replica server: the peer closed the connection while %s was sent", path)
                self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature
        log.debug("replica server: " + format, *args)


def _plain(name: str) -> bool:
    """A file name inside a step directory: no separator, no dot file, no '..'."""
    return bool(name) and not name.startswith(".") and set(name) <= _NAME_OK
