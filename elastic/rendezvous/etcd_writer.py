"""How an agent writes the run's keys in etcd: one request retried through an outage, and a
transaction that waits until the mirror shows its outcome and is not fooled by its own
write when a reply was lost. elastic/rendezvous/etcd_state.py builds every write on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from elastic.errors import RendezvousConnectionError
from elastic.rendezvous.etcd_client import TRANSIENT_ERRORS, Put
from elastic.rendezvous.run_view import RunView

log = logging.getLogger(__name__)
T = TypeVar("T")


class EtcdWriter(RunView):
    """The run's keys as this agent mirrors them (RunView), and its requests that change them."""

    def __init__(self, client, prefix: str, retry_for: float) -> None:
        super().__init__(client, prefix)
        self._tx = client.transactions
        self.writes = 0  # etcd write requests made (for benchmarks)
        self.failed_txns = 0  # transactions whose compare failed: lost CAS races (for benchmarks)
        self.retry_for = retry_for  # how long one request may wait out an etcd outage

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
        succeeded, else the compared keys as they were when the compare failed.

        A transaction is not idempotent: when an attempt's reply is lost (a timeout, a broken
        connection), etcd may still have applied it, and the retry's compare then fails on
        our own write ("node id in use by another live agent"). So when a retried
        transaction's compare fails, the keys it puts are read back (_applied_by_us)."""
        self.writes += 1
        compared = list(dict.fromkeys(c.key for c in compare))
        attempts = 0

        def attempt():
            nonlocal attempts
            attempts += 1
            return self._client.transaction(compare=compare, success=success,
                                            failure=[self._tx.get(key) for key in compared])

        ok, responses = self._retry("a transaction", attempt)
        if ok:
            revision = max(getattr(r, r.WhichOneof("response")).header.revision for r in responses)
        else:
            revision = max((meta.mod_revision for kvs in responses for _value, meta in kvs), default=0)
            ours = self._applied_by_us(success) if attempts > 1 else None
            if ours is None:
                self.failed_txns += 1
            else:
                ok, revision = True, ours
        self.wrote(revision)
        return ok

    def _applied_by_us(self, ops: list) -> int | None:
        """The revision of an earlier attempt of a transaction with `ops` that etcd applied
        though its reply was lost: every key it puts holds the value it put, on the lease it
        put it with (ours, for the keys bound to this agent's lease). None when that is not
        so (or it puts nothing to recognise it by): the compare failed on another's write."""
        puts = [op for op in ops if isinstance(op, Put)]
        if not puts:
            return None
        _ok, found = self._retry("reading back a transaction", lambda: self._client.transaction(
            compare=[], success=[self._tx.get(op.key) for op in puts], failure=[]))
        revisions = []
        for op, kvs in zip(puts, found):
            value, meta = kvs[0] if kvs else (None, None)
            lease_id = op.lease.id if op.lease is not None else 0
            if value != _as_bytes(op.value) or meta.lease_id != lease_id:
                return None
            revisions.append(meta.mod_revision)
        log.info("rendezvous: a transaction whose reply was lost had been applied; it was ours")
        return max(revisions)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value
