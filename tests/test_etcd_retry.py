"""A transaction whose reply was lost, against a real etcd paused (SIGSTOP) across the write.

The client gives up on the paused etcd (timeout); once etcd resumes it may still apply that
request, and the retry's compare then fails on our own write. The backend must read the key
back and see that the write was ours, not conclude that another agent holds it.
"""

from __future__ import annotations

import os
import signal

import pytest

from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.rendezvous.etcd_state import EtcdBackend

TRIES = 30  # etcd applies a request it resumes to about every other time (the cancel may win)


class PausingClient:
    """The backend's real etcd client, whose first transaction that puts `key` is sent to
    an etcd paused by SIGSTOP; etcd resumes (SIGCONT) once that attempt timed out."""

    def __init__(self, endpoint: str, etcd_pid: int, key: str) -> None:
        self._client = connect(EtcdConfig(endpoint, timeout=0.5), check=False)  # short: the pause must time out
        self._pid = etcd_pid
        self._key = key
        self.paused = False
        self.lost_reply_applied = False  # the retry found the paused attempt applied

    def __getattr__(self, name):
        return getattr(self._client, name)

    def transaction(self, compare, success, failure):
        if self.paused or not any(op.key == self._key for op in success):
            succeeded, responses = self._client.transaction(compare=compare, success=success, failure=failure)
            self.lost_reply_applied |= self.paused and not succeeded and any(op.key == self._key for op in success)
            return succeeded, responses
        self.paused = True
        os.kill(self._pid, signal.SIGSTOP)
        try:
            return self._client.transaction(compare=compare, success=success, failure=failure)
        finally:
            os.kill(self._pid, signal.SIGCONT)


def lost_reply(private_etcd, run_id: str, key_of, act) -> EtcdBackend:
    """Run `act(backend)` with the write of `key_of(node)` paused across its timeout, until
    etcd has applied such a paused attempt (then the retry's compare failed on it)."""
    for attempt in range(TRIES):
        node = f"node{attempt}"
        client = PausingClient(private_etcd.endpoint, private_etcd.pid, f"/test/{run_id}/{key_of(node)}")
        backend = EtcdBackend(client, "test", run_id, node, retry_for=30.0)
        backend.open_lease(30)
        act(backend)
        if client.lost_reply_applied:
            return backend
        backend.shutdown()
    pytest.fail(f"etcd never applied a request paused across its timeout in {TRIES} tries")


def test_an_announce_whose_reply_was_lost_is_ours_not_another_agent_s(private_etcd, run_id):
    def announce(backend: EtcdBackend) -> None:
        assert backend.announce(), "our own alive key was taken for another live agent's"

    lost_reply(private_etcd, run_id, lambda node: f"alive/{node}", announce).shutdown()


def test_a_round_bump_whose_reply_was_lost_counts_one_restart(private_etcd, run_id):
    etcd = connect(EtcdConfig(private_etcd.endpoint))
    bumped = []

    def bump(backend: EtcdBackend) -> None:
        backend.announce()
        round_ = int(etcd.get(f"/test/{run_id}/round")[0])
        assert backend.bump_round(round_, reason="rank 0 raised X", failed_node=backend.node_id)
        bumped.append(round_)

    backend = lost_reply(private_etcd, run_id, lambda node: "restarts", bump)  # only a failure's bump puts it
    assert int(etcd.get(f"/test/{run_id}/restarts")[0]) == len(bumped)  # each counted once, the lost one too
    assert int(etcd.get(f"/test/{run_id}/round")[0]) == len(bumped)
    backend.shutdown()
    etcd.close()
