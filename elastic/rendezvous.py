"""Round-based rendezvous over etcd v3.

Keys, all under /<prefix>/<run_id>/:
  round                      current round number; bumped by compare-and-swap
  restarts                   job-wide count of failure restarts (bumped with the round)
  closed                     JSON {"ok", "reason"}: the job is over, nobody joins again
  rounds/<r>/members/<node>  JSON member record, attached to the node's lease
  rounds/<r>/sealed          JSON sealed record, created once by a transaction
  rounds/<r>/done/<node>     the node's workers all finished successfully

A node joins the current round; once MIN members are there the round is sealed at once if
every live member of the previous round is back (or MAX joined), else after a last-call
window for newcomers. Everyone learns the sealed record through a watch on the run's keys.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass

from elastic.errors import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from elastic.etcd_client import TRANSIENT_ERRORS
from elastic.launch_config import LaunchConfig
from elastic.workers import Assignment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    node_id: str
    addr: str
    port: int  # a port this node reserved for torch.distributed's store, if it is the master
    nproc: int


@dataclass(frozen=True)
class SealedRound:
    round: int
    members: tuple[Member, ...]
    restart_count: int

    def to_json(self) -> str:
        return json.dumps({"round": self.round, "restart_count": self.restart_count,
                           "members": [asdict(m) for m in self.members]})

    @classmethod
    def from_json(cls, raw: bytes) -> SealedRound:
        data = json.loads(raw)
        return cls(data["round"], tuple(Member(**m) for m in data["members"]), data["restart_count"])

    def assignment_for(self, node_id: str) -> Assignment | None:
        offset = 0
        for index, member in enumerate(self.members):
            if member.node_id == node_id:
                first = self.members[0]
                return Assignment(
                    round=self.round, group_rank=index, num_nodes=len(self.members),
                    world_size=sum(m.nproc for m in self.members), rank_offset=offset,
                    master_addr=first.addr, master_port=first.port,
                    restart_count=self.restart_count,
                )
            offset += member.nproc
        return None


class EtcdRendezvous:
    """One agent's view of the job's rendezvous. Not thread-safe except `wake`/`changed`."""

    def __init__(self, client, config: LaunchConfig, node_id: str, addr: str,
                 port_picker) -> None:
        self._client = client
        self._config = config
        self._settings = config.rdzv
        self._node_id = node_id
        self._addr = addr
        self._pick_port = port_picker
        self._prefix = f"/{self._settings.key_prefix.strip('/')}/{config.run_id}/"
        self._lease = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch_id = None
        self._watch_broken = False
        self._keepalive: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Take a lease (kept alive in the background) and watch the run's keys."""
        self._lease = self._client.lease(int(self._settings.lease_ttl))
        self._keepalive = threading.Thread(target=self._keep_alive, name="rdzv-keepalive", daemon=True)
        self._keepalive.start()
        self._watch_id = self._client.add_watch_prefix_callback(self._prefix, self._on_event)
        # The round key exists from the first join on; creating it twice is harmless.
        self._client.transaction(
            compare=[self._client.transactions.create(self._key("round")) == 0],
            success=[self._client.transactions.put(self._key("round"), "0")],
            failure=[],
        )

    def shutdown(self) -> None:
        self._stop.set()
        if self._watch_id is not None:
            self._client.cancel_watch(self._watch_id)
        if self._lease is not None:
            try:
                self._lease.revoke()
            except TRANSIENT_ERRORS:
                pass  # etcd gone: the lease expires by itself
        self._client.close()

    def _keep_alive(self) -> None:
        interval = self._settings.lease_ttl / 3
        while not self._stop.wait(interval):
            try:
                self._lease.refresh()
            except TRANSIENT_ERRORS as exc:
                log.warning("rendezvous: lease refresh failed (%s); retrying", type(exc).__name__)

    def _on_event(self, response) -> None:
        # An exception instead of a response: the watch stream broke (etcd restarted or
        # unreachable). wait_for_change() sets up a new watch.
        if isinstance(response, Exception):
            self._watch_broken = True
        self._wake.set()

    def wake(self) -> None:
        """Make a pending wait_for_change() return now (signal handlers use this)."""
        self._wake.set()

    def wait_for_change(self, timeout: float) -> bool:
        """Block until some key of the run changed (True) or `timeout` passed (False)."""
        fired = self._wake.wait(timeout)
        self._wake.clear()
        if self._watch_broken:
            try:
                self._watch_id = self._client.add_watch_prefix_callback(self._prefix, self._on_event)
                self._watch_broken = False
                log.info("rendezvous: watch on %s re-established", self._prefix)
            except TRANSIENT_ERRORS:
                pass  # still down: the next wait tries again
        return fired

    # -- reads -----------------------------------------------------------------------------

    def _key(self, suffix: str) -> str:
        return self._prefix + suffix

    def _get(self, suffix: str) -> bytes | None:
        try:
            return self._client.get(self._key(suffix))[0]
        except TRANSIENT_ERRORS as exc:
            raise RendezvousConnectionError(f"etcd unreachable while reading {suffix}") from exc

    def current_round(self) -> int:
        raw = self._get("round")
        return int(raw) if raw is not None else 0

    def restart_count(self) -> int:
        raw = self._get("restarts")
        return int(raw) if raw is not None else 0

    def closed(self) -> dict | None:
        raw = self._get("closed")
        return json.loads(raw) if raw is not None else None

    def _members(self, round_: int) -> dict[str, Member]:
        prefix = self._key(f"rounds/{round_}/members/")
        return {
            meta.key.decode()[len(prefix):]: Member(**json.loads(value))
            for value, meta in self._client.get_prefix(prefix)
        }

    def _sealed(self, round_: int) -> SealedRound | None:
        raw = self._get(f"rounds/{round_}/sealed")
        return SealedRound.from_json(raw) if raw is not None else None

    # -- the protocol ----------------------------------------------------------------------

    def join(self) -> Assignment:
        """Join the current round and return this node's assignment once it is sealed."""
        deadline = time.monotonic() + self._settings.join_timeout
        while True:
            self._raise_if_closed()
            round_ = self.current_round()
            sealed = self._sealed(round_)
            if sealed is None:
                assignment = self._join_round(round_, deadline)
                if assignment is not None:
                    return assignment
            elif len(sealed.members) < self._config.max_nodes:
                # Too late for this round: ask for the next one, which will include us.
                self.bump_round(round_, reason=f"node {self._node_id} waiting to join", failure=False)
            else:
                self._wait_as_spare(round_)

    def _wait_as_spare(self, round_: int) -> None:
        """The round is full (or we did not fit its world size): wait for the next one."""
        log.info("rendezvous: node %s waits as a spare for a round after %d", self._node_id, round_)
        while self.current_round() == round_:
            self._raise_if_closed()
            self.wait_for_change(1.0)

    def _join_round(self, round_: int, deadline: float) -> Assignment | None:
        member = Member(self._node_id, self._addr, self._pick_port(), self._config.nproc_per_node)
        self._client.put(self._key(f"rounds/{round_}/members/{self._node_id}"),
                         json.dumps(asdict(member)), lease=self._lease)
        log.info("rendezvous: node %s joined round %d of run %s", self._node_id, round_,
                 self._config.run_id)
        previous = self._live_previous_members(round_)
        min_reached_at: float | None = None
        while True:
            self._raise_if_closed()
            if self.current_round() != round_:
                return None
            sealed = self._sealed(round_)
            if sealed is not None:
                assignment = sealed.assignment_for(self._node_id)
                if assignment is None:
                    self._wait_as_spare(round_)
                return assignment
            members = self._members(round_)
            now = time.monotonic()
            if len(members) >= self._config.min_nodes:
                min_reached_at = min_reached_at or now
                everyone_back = previous and previous <= members.keys()
                if (len(members) >= self._config.max_nodes or everyone_back
                        or now - min_reached_at >= self._settings.last_call_timeout):
                    self._seal(round_, members, previous)
                    continue
                wait = self._settings.last_call_timeout - (now - min_reached_at)
            else:
                min_reached_at = None
                if now >= deadline:
                    raise RendezvousTimeoutError(
                        f"only {len(members)} of at least {self._config.min_nodes} nodes joined run "
                        f"{self._config.run_id!r} within {self._settings.join_timeout:.0f}s"
                    )
                wait = deadline - now
            self.wait_for_change(min(wait, 1.0))

    def _live_previous_members(self, round_: int) -> set[str]:
        if round_ == 0:
            return set()
        previous = self._sealed(round_ - 1)
        alive = self._members(round_ - 1).keys()
        return {m.node_id for m in previous.members if m.node_id in alive} if previous else set()

    def _seal(self, round_: int, members: dict[str, Member], previous: set[str]) -> None:
        # Survivors keep their relative order (stable ranks); newcomers follow by node id.
        order = []
        if round_ > 0 and (prev := self._sealed(round_ - 1)) is not None:
            order = [m.node_id for m in prev.members if m.node_id in members]
        order += sorted(n for n in members if n not in order)
        count = min(len(order), self._config.max_nodes)
        count -= count % self._settings.world_size_multiple
        record = SealedRound(round_, tuple(members[n] for n in order[:count]), self.restart_count())
        key = self._key(f"rounds/{round_}/sealed")
        won, _ = self._client.transaction(
            compare=[self._client.transactions.create(key) == 0],
            success=[self._client.transactions.put(key, record.to_json())],
            failure=[],
        )
        if won:
            log.info("rendezvous: sealed round %d of run %s with %d nodes", round_,
                     self._config.run_id, count)

    def bump_round(self, round_: int, *, reason: str, failure: bool) -> bool:
        """Move the job to round+1 (compare-and-swap); a failure also spends one restart."""
        tx = self._client.transactions
        round_key, restarts_key = self._key("round"), self._key("restarts")
        restarts_raw, restarts_meta = self._client.get(restarts_key)
        compare = [tx.value(round_key) == str(round_)]
        success = [tx.put(round_key, str(round_ + 1))]
        if failure:
            restarts = int(restarts_raw) if restarts_raw is not None else 0
            compare.append(tx.version(restarts_key) == (restarts_meta.version if restarts_meta else 0))
            success.append(tx.put(restarts_key, str(restarts + 1)))
        won, _ = self._client.transaction(compare=compare, success=success, failure=[])
        if won:
            log.info("rendezvous: round %d -> %d of run %s: %s", round_, round_ + 1,
                     self._config.run_id, reason)
        return won

    def mark_done(self, round_: int) -> None:
        self._client.put(self._key(f"rounds/{round_}/done/{self._node_id}"), "1")

    def sealed_members(self, round_: int) -> tuple[str, ...]:
        sealed = self._sealed(round_)
        return tuple(m.node_id for m in sealed.members) if sealed else ()

    def departed_members(self, sealed_round: int, members: tuple[str, ...]) -> list[str]:
        """Members of a sealed round whose lease is gone without their workers finishing."""
        alive = self._members(sealed_round).keys()
        done_prefix = self._key(f"rounds/{sealed_round}/done/")
        done = {m.key.decode()[len(done_prefix):] for _, m in self._client.get_prefix(done_prefix)}
        return [n for n in members if n not in alive and n not in done]

    def close(self, *, ok: bool, reason: str) -> None:
        """End the job for every agent (create-if-absent: the first reason wins)."""
        key = self._key("closed")
        self._client.transaction(
            compare=[self._client.transactions.create(key) == 0],
            success=[self._client.transactions.put(key, json.dumps({"ok": ok, "reason": reason}))],
            failure=[],
        )

    def _raise_if_closed(self) -> None:
        closed = self.closed()
        if closed is not None:
            raise RendezvousClosedError(closed["reason"])
