"""The rendezvous state in etcd v3: key layout, a watched local mirror, and the transactions.

Keys, all under /<prefix>/<run_id>/:
  round                      current round number; moved on by compare-and-swap
  restarts                   job-wide count of failure restarts (moved with the round)
  sealed_round               the newest sealed round (what commits are fenced against)
  closed                     JSON {"ok", "reason"}: the job is over; nobody joins again
  alive/<node>               presence of a node's agent, bound to its lease
  waiting/<node>             a node that wants into the running round, bound to its lease
  nodes/<node>               JSON NodeRecord: failures of a node, kept across agent restarts
  rounds/<r>/members/<node>  JSON Member, bound to the node's lease
  rounds/<r>/sealed          JSON SealedRound, created once by a transaction
  rounds/<r>/done/<node>     the node's workers all finished successfully
  rounds/<r>/left/<node>     the node left on purpose (scale-down, not a failure)
  rounds/<r>/end             JSON {"failure", "reason"}: why round r was ended
  rounds/<r>/failed/<node>   when the node's workers failed in round r (to blame the first)

Every agent keeps a mirror of these keys: one range read, then a watch from the next
revision. Decisions read the mirror, so waiting costs no requests; only writes go to etcd.
Sealing round r deletes round r-2, so the mirror stays small however long the job runs.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from elastic.errors import RendezvousConnectionError
from elastic.rendezvous.etcd_client import ANY_ETCD_ERROR, TRANSIENT_ERRORS, DeleteEvent, prefix_range_end
from elastic.rendezvous.protocol import FailureClaim, Member, NodeRecord, RunState, SealedRound

log = logging.getLogger(__name__)
T = TypeVar("T")
OWN_WRITE_LAG = 30.0  # seconds a lagging watch is waited for before decisions go on without it


def _member(raw: bytes) -> Member:
    return Member.from_json(raw)


@functools.lru_cache(maxsize=64)
def _sealed(raw: bytes) -> SealedRound:
    """Parse a sealed record once (it never changes; every decision of the next round reads it)."""
    return SealedRound.from_json(raw)


class _Mirror:
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


class EtcdBackend:
    """One agent's connection to the run's keys. Writes are transactions; reads use the mirror."""

    def __init__(self, client, key_prefix: str, run_id: str, node_id: str,
                 clock: Callable[[], float] = time.time, retry_for: float = 10.0) -> None:
        self._client = client
        self._tx = client.transactions
        self.prefix = f"/{key_prefix.strip('/')}/{run_id}/"
        self.node_id = node_id
        self._clock = clock
        self._lease = None
        self._mirror = _Mirror({})
        self._changed = threading.Condition()
        self._version = 0  # bumped on every mirror change
        self._revision = 0  # etcd revision the mirror reflects
        self._written = 0  # etcd revision of this agent's newest write under the prefix
        self._written_at = 0.0  # time.monotonic() of that write
        self._watch_id = None
        self._watch_broken = False
        self.writes = 0  # etcd write requests made (for benchmarks)
        self.failed_txns = 0  # transactions whose compare failed: lost CAS races (for benchmarks)
        self.retry_for = retry_for  # how long one request may wait out an etcd outage

    # -- lease -------------------------------------------------------------------------------

    def open_lease(self, ttl: float) -> None:
        self._lease = self._retry("taking a lease", lambda: self._client.lease(max(2, int(round(ttl)))))
        self.writes += 1

    def refresh_lease(self) -> bool:
        """Keep the lease alive; False when etcd says it has expired (we were cut off too long)."""
        responses = self._lease.refresh()
        return bool(responses) and responses[0].TTL > 0

    def revoke_lease(self) -> None:
        if self._lease is not None:
            try:
                self._lease.revoke()
            except ANY_ETCD_ERROR:
                pass  # etcd unreachable, or the lease already expired: nothing to release

    # -- mirror --------------------------------------------------------------------------------

    def sync(self) -> None:
        """(Re)load the mirror with one range read and watch every change after it."""
        response = self._client.get_prefix_response(self.prefix)
        revision = response.header.revision
        fresh = _Mirror({kv.key.decode()[len(self.prefix):]: kv.value for kv in response.kvs})
        with self._changed:
            self._mirror = fresh
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
                        self._mirror.delete(key)
                    else:
                        self._mirror.put(key, event.value)
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

    def _get(self, suffix: str) -> bytes | None:
        return self._mirror.get(suffix)

    def _children(self, suffix: str) -> dict[str, bytes]:
        return self._mirror.children(suffix)

    def current_round(self) -> int:
        raw = self._get("round")
        return int(raw) if raw is not None else 0

    def restarts(self) -> int:
        raw = self._get("restarts")
        return int(raw) if raw is not None else 0

    def closed(self) -> dict | None:
        raw = self._get("closed")
        return json.loads(raw) if raw is not None else None

    def sealed(self, round_: int) -> SealedRound | None:
        raw = self._get(f"rounds/{round_}/sealed")
        return _sealed(raw) if raw is not None else None

    def round_end(self, round_: int) -> dict | None:
        raw = self._get(f"rounds/{round_}/end")
        return json.loads(raw) if raw is not None else None

    def alive(self) -> set[str]:
        return self._mirror.names("alive/")

    def finished(self, round_: int) -> set[str]:
        """Members of `round_` that finished or left on purpose (their absence is no failure)."""
        return set(self._children(f"rounds/{round_}/done/")) | set(self._children(f"rounds/{round_}/left/"))

    def join_state(self) -> RunState:
        """The state a joining node decides on. Once the current round is sealed or the job
        closed, decide_join reads nothing else, so the per-member work is skipped: with N
        agents, all of them re-read the state on the seal's event."""
        round_ = self.current_round()
        closed, sealed = self.closed(), self.sealed(round_)
        if closed is not None or sealed is not None:
            return RunState(round=round_, closed=closed, sealed=sealed)
        return self.state()

    def members(self, round_: int, only: Iterable[str] | None = None) -> dict[str, Member]:
        """The nodes registered for `round_` (kept until round + 2 is sealed), or those of
        them named in `only`."""
        return self._mirror.parsed(f"rounds/{round_}/members/", _member, only)

    def state(self) -> RunState:
        """The protocol's view of the current round, from the mirror."""
        round_ = self.current_round()
        previous = self.sealed(round_ - 1) if round_ > 0 else None
        alive = self.alive()
        gone_on_purpose = self.finished(round_ - 1) if previous else set()
        previous_alive = frozenset(
            n for n in (previous.node_ids if previous else ()) if n in alive and n not in gone_on_purpose)
        return RunState(
            round=round_,
            closed=self.closed(),
            sealed=self.sealed(round_),
            members=self.members(round_),
            previous=previous,
            previous_alive=previous_alive,
            waiting=frozenset(self._children("waiting/")),
            nodes={n: NodeRecord.from_json(v) for n, v in self._children("nodes/").items()},
            restarts=self.restarts(),
        )

    # -- writes -------------------------------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Run one etcd request, retrying with backoff through an outage of up to `retry_for` s."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                return call()
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise RendezvousConnectionError(
                        f"etcd did not answer for {self.retry_for:g}s during {what}: {type(exc).__name__}"
                    ) from exc
                log.warning("rendezvous: etcd unavailable during %s; retrying in %.1fs", what, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _txn(self, compare, success) -> bool:
        """Run one transaction, then wait until the mirror shows its outcome: our write if it
        succeeded, else the compared keys as they were when the compare failed."""
        self.writes += 1
        compared = list(dict.fromkeys(c.key for c in compare))
        ok, responses = self._retry("a transaction", lambda: self._client.transaction(
            compare=compare, success=success, failure=[self._tx.get(key) for key in compared]))
        if ok:
            revision = max(getattr(r, r.WhichOneof("response")).header.revision for r in responses)
        else:
            self.failed_txns += 1
            revision = max((meta.mod_revision for kvs in responses for _value, meta in kvs), default=0)
        if revision > self._written:
            self._written, self._written_at = revision, time.monotonic()
        self._catch_up(revision)
        return ok

    def behind_own_writes(self) -> bool:
        """Whether the mirror has yet to show this agent's newest transaction's outcome (the
        watch lags behind when etcd or this host is overloaded). A decision taken on such a
        mirror would repeat the write: a registration sent again, a seal tried twice. Trusted
        for OWN_WRITE_LAG s at most: a watch that died silently must not stall the agent."""
        return (self._revision < self._written and not self._watch_broken
                and time.monotonic() - self._written_at < OWN_WRITE_LAG)

    def _catch_up(self, revision: int, timeout: float = 5.0) -> None:
        """Read-your-writes: wait until the mirror reflects `revision`, a change under the
        run's prefix (so its watch delivers it). Not the store's current revision: writes of
        other runs on the same etcd never reach this watch."""
        if self._watch_id is None:
            return  # no mirror yet: sync() will read everything
        with self._changed:
            self._changed.wait_for(lambda: self._revision >= revision or self._watch_broken, timeout)

    def _key(self, suffix: str) -> str:
        return self.prefix + suffix

    def announce(self) -> bool:
        """Create the round key if the run is new, and mark this agent alive (on its lease).

        False when another live agent holds this node id (its `alive` key exists).
        """
        self._txn([self._tx.create(self._key("round")) == 0], [self._tx.put(self._key("round"), "0")])
        alive = self._key(f"alive/{self.node_id}")
        return self._txn([self._tx.create(alive) == 0], [self._tx.put(alive, "1", lease=self._lease)])

    def start_new_generation_if_over(self) -> bool:
        """A closed job with no live agent is over: clear `closed` so a relaunch can run.

        The round number is kept (it only grows, so workers of the old job stay fenced) and
        the restart budget starts again, as it does for a new torchrun launch.
        """
        raw, meta = self._client.get(self._key("closed"))
        if raw is None or self._client.get_prefix_response(self._key("alive/"), count_only=True).count:
            return False
        return self._txn(
            [self._tx.mod(self._key("closed")) == meta.mod_revision],
            [self._tx.delete(self._key("closed")), self._tx.delete(self._key("restarts"))],
        )

    def register(self, round_: int, member: Member, seal: SealedRound | None = None) -> bool:
        """Join `round_` (only while it is the current round and not yet sealed); with
        `seal`, seal it in the same transaction (this registration completes the round)."""
        put = self._tx.put(self._key(f"rounds/{round_}/members/{member.node_id}"),
                           member.to_json(), lease=self._lease)
        return self._txn(self._unsealed(round_), [put, *(self._seal_ops(seal) if seal else ())])

    def seal(self, record: SealedRound) -> bool:
        """Create the sealed record once."""
        return self._txn(self._unsealed(record.round), self._seal_ops(record))

    def _unsealed(self, round_: int) -> list:
        """Compares: `round_` is the current round and nobody sealed it yet."""
        return [self._tx.value(self._key("round")) == str(round_),
                self._tx.create(self._key(f"rounds/{round_}/sealed")) == 0]

    def _seal_ops(self, record: SealedRound) -> list:
        """Write the sealed record; also drop round r-2 so the key space stays small."""
        r = record.round
        ops = [self._tx.put(self._key(f"rounds/{r}/sealed"), record.to_json()),
               self._tx.put(self._key("sealed_round"), str(r))]
        if r >= 2:
            old = self._key(f"rounds/{r - 2}/")
            ops.append(self._tx.delete(old, range_end=prefix_range_end(old)))
        return ops

    def bump_round(self, round_: int, *, reason: str, failed_node: str | None, restart: bool = True) -> bool:
        """Move the job to round+1 by compare-and-swap, recording why round `round_` ended.

        With `failed_node`, it is a failure: the job's restart count (unless not `restart`:
        no worker had started) and that node's failure record move in the same transaction,
        so only the agent that wins the race counts it.
        """
        end = json.dumps({"failure": failed_node is not None, "reason": reason})
        compare = [self._tx.value(self._key("round")) == str(round_)]
        success = [self._tx.put(self._key("round"), str(round_ + 1)),
                   self._tx.put(self._key(f"rounds/{round_}/end"), end)]
        if failed_node is not None:
            restarts_raw, restarts_meta = self._retry("a read", lambda: self._client.get(self._key("restarts")))
            node_raw, node_meta = self._retry("a read", lambda: self._client.get(self._key(f"nodes/{failed_node}")))
            record = NodeRecord.from_json(node_raw) if node_raw else NodeRecord()
            record = NodeRecord(record.failures + 1, self._clock())
            compare += [
                self._tx.version(self._key("restarts")) == (restarts_meta.version if restarts_meta else 0),
                self._tx.version(self._key(f"nodes/{failed_node}")) == (node_meta.version if node_meta else 0),
            ]
            restarts = (int(restarts_raw) if restarts_raw else 0) + (1 if restart else 0)
            success += [
                self._tx.put(self._key("restarts"), str(restarts)),
                self._tx.put(self._key(f"nodes/{failed_node}"), record.to_json()),
            ]
        return self._txn(compare, success)

    def set_waiting(self, waiting: bool) -> None:
        key = self._key(f"waiting/{self.node_id}")
        self.writes += 1
        if waiting:
            put = self._retry("registering as waiting", lambda: self._client.put(key, "1", lease=self._lease))
            self._catch_up(put.header.revision)
        else:
            deleted = self._retry("leaving the waiting list",
                                  lambda: self._client.delete(key, return_response=True))
            self._catch_up(deleted.header.revision if deleted.deleted else 0)

    def mark(self, round_: int, what: str) -> None:
        """Record that this node is `done` with, or `left`, round `round_`."""
        key = self._key(f"rounds/{round_}/{what}/{self.node_id}")
        put = self._retry(f"marking {what}", lambda: self._client.put(key, "1"))
        self.writes += 1
        self._catch_up(put.header.revision)

    def claim_failure(self, round_: int, claim: FailureClaim) -> None:
        """Say that this node's workers failed in `round_` (when, and which peers it cannot reach)."""
        key = self._key(f"rounds/{round_}/failed/{self.node_id}")
        self._retry("claiming a failure", lambda: self._client.put(key, claim.to_json()))
        self.writes += 1

    def failure_claims(self, round_: int) -> dict[str, FailureClaim]:
        return {n: FailureClaim.from_json(v) for n, v in self._children(f"rounds/{round_}/failed/").items()}

    def close(self, *, ok: bool, reason: str) -> None:
        """End the job for every agent; the first reason wins."""
        key = self._key("closed")
        self._txn([self._tx.create(key) == 0], [self._tx.put(key, json.dumps({"ok": ok, "reason": reason}))])

    def shutdown(self) -> None:
        if self._watch_id is not None:
            try:
                self._client.cancel_watch(self._watch_id)
            except ANY_ETCD_ERROR:
                pass  # the stream is gone anyway
        self.revoke_lease()
        self._client.close()
