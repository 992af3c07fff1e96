"""Shared fixtures: a real etcd server per test session (and a fresh one on demand)."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from elastic.etcd_server import EtcdServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """Environment for child processes: this interpreter's packages plus the repo on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def python_exe() -> str:
    return sys.executable
