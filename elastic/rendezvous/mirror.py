"""The run's keys mirrored in this agent: one range read, then a watch from the next revision.

Decisions read the mirror, so waiting costs no requests; only writes go to etcd. The mirror
knows which etcd revision it reflects, so a writer can wait until it shows its own write
(read-your-writes), and a decision is not taken on a mirror that has yet to show it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR, TRANSIENT_ERRORS, DeleteEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
OWN_WRITE_LAG = 30.0  # seconds a lagging watch is waited for before decisions go on without it


class KeyIndex:
    """The run's keys (relative to its prefix), also indexed by parent directory, so that
    listing one directory (the members of a round, the live nodes) costs its own size rather
    than the whole run's: with N agents every agent re-reads the state on every change.
    Updated by the watch thread, read by the agent's."""

    def __init__(self, kvs: dict[str, bytes]) -> None:
        self._values: dict[str, bytes] = {}
        self._dirs: dict[str, dict[str, bytes]] = {}
        self._parsed: dict[str, dict[str, object]] = {}  # see parsed()
        self._lock = threading.Lock()
        for key, value in kvs.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        parent, _, name = key.rpartition("/")
        with self._lock:
            self._values[key] = value
            self._dirs.setdefault(parent + "/", {})[name] = value
            self._parsed.get(parent + "/", {}).pop(name, None)

    def delete(self, key: str) -> None:
        parent, _, name = key.rpartition("/")
        with self._lock:
            if self._values.pop(key, None) is None:
                return
            children = self._dirs[parent + "/"]
            del children[name]
            self._parsed.get(parent + "/", {}).pop(name, None)
            if not children:
                del self._dirs[parent + "/"]
                self._parsed.pop(parent + "/", None)

    def parsed(self, parent: str, parse: Callable[[bytes], T], only: Iterable[str] | None = None) -> dict[str, T]:
        """{name: parse(value)} of the keys directly under `parent` (those named in `only`,
        if given), each value parsed once and kept until it changes: at 1,024 nodes,
        re-parsing a round's members on every change costs every agent more than the rest
        of its decision."""
        with self._lock:
            children = self._dirs.get(parent, {})
            cache = self._parsed.setdefault(parent, {})
            if len(cache) != len(children):  # put() and delete() drop the entries they change
                for name, value in children.items():
                    if name not in cache:
                        cache[name] = parse(value)
            return dict(cache) if only is None else {n: cache[n] for n in only if n in cache}

    def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    def children(self, parent: str) -> dict[str, bytes]:
        """{name: value} of the keys directly under `parent` (which ends in '/'), a copy."""
        return dict(self._dirs.get(parent, ()))

    def names(self, parent: str) -> set[str]:
        """The names of the keys directly under `parent`."""
        with self._lock:
            return set(self._dirs.get(parent, ()))


class Mirror:
    """The watched copy of the keys under `prefix`: `keys` to read, `wait` for a change."""

    def __init__(self, client, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self.keys = KeyIndex({})
        self._changed = threading.Condition()
        self._version = 0  # bumped on every mirror change
        self._revision = 0  # etcd revision the mirror reflects
        self._written = 0  # etcd revision of this agent's newest write under the prefix
        self._written_at = 0.0  # time.monotonic() of that write
        self._watch_id = None
        self._watch_broken = False

    def sync(self) -> None:
        """(Re)load the mirror with one range read and watch every change after it."""
        response = self._client.get_prefix_response(self.prefix)
        revision = response.header.revision
        fresh = KeyIndex({kv.key.decode()[len(self.prefix):]: kv.value for kv in response.kvs})
        with self._changed:
            self.keys = fresh
            self._revision = revision
            self._version += 1
            self._changed.notify_all()
        if self._watch_id is not None:
            self._client.cancel_watch(self._watch_id)
        self._watch_id = self._client.add_watch_prefix_callback(
            self.prefix, self._on_watch, start_revision=revision + 1)
        self._watch_broken = False

    def _on_watch(self, response) -> None:
        with self._changed:
            if isinstance(response, Exception):
                # The stream broke (etcd restarted or unreachable): resync in wait().
                self._watch_broken = True
            else:
                for event in response.events:
                    key = event.key.decode()[len(self.prefix):]
                    if isinstance(event, DeleteEvent):
                        self.keys.delete(key)
                    else:
                        self.keys.put(key, event.value)
                self._revision = max(self._revision, response.header.revision)
            self._version += 1
            self._changed.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def wait(self, since: int, timeout: float) -> bool:
        """Wait until the mirror changed after version `since` (True) or `timeout` (False)."""
        with self._changed:
            changed = self._changed.wait_for(lambda: self._version != since, timeout=max(0.0, timeout))
        if self._watch_broken:
            try:
                self.sync()
                log.info("rendezvous: watch on %s re-established", self.prefix)
            except TRANSIENT_ERRORS:
                pass  # still unreachable: the next wait tries again
        return changed

    def poke(self) -> None:
        """Wake every wait() now (used by signal handlers)."""
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def wrote(self, revision: int) -> None:
        """Note the outcome of this agent's transaction at `revision`, and wait until the
        mirror shows it."""
        if revision > self._written:
            self._written, self._written_at = revision, time.monotonic()
        self.catch_up(revision)

    def behind_own_writes(self) -> bool:
        """Whether the mirror has yet to show this agent's newest transaction's outcome (the
        watch lags behind when etcd or this host is overloaded). A decision taken on such a
        mirror would repeat the write: a registration sent again, a seal tried twice. Trusted
        for OWN_WRITE_LAG s at most: a watch that died silently must not stall the agent."""
        return (self._revision < self._written and not self._watch_broken
                and time.monotonic() - self._written_at < OWN_WRITE_LAG)

    def catch_up(self, revision: int, timeout: float = 5.0) -> None:
        """Read-your-writes: wait until the mirror reflects `revision`, a change under the
        run's prefix (so its watch delivers it). Not the store's current revision: writes of
        other runs on the same etcd never reach this watch."""
        if self._watch_id is None:
            return  # no mirror yet: sync() will read everything
        with self._changed:
            self._changed.wait_for(lambda: self._revision >= revision or self._watch_broken, timeout)

    def stop_watching(self) -> None:
        if self._watch_id is not None:
            try:
                self._client.cancel_watch(self._watch_id)
            except ANY_ETCD_ERROR:
                pass  # the stream is gone anyway
