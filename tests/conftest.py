"""Shared fixtures: a real etcd server per test session (and a fresh one on demand)."""

from __future__ import annotations

import uuid

import pytest

from elastic.rendezvous.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd_server():
    """One real etcd for the whole session; tests isolate themselves by run id."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def private_etcd():
    """A real etcd of this test's own, for tests that kill, pause or restart it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def python_env() -> dict[str, str]:
    """Environment for child processes (helpers.child_env() as a fixture)."""
    from helpers import child_env

    return child_env()
