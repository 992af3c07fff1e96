"""Replication of memory checkpoints between agents (elastic/launcher/replica_server.py and
replica_pull.py): a real HTTP server over one node's memory directory, a real pulling thread
into another's, both on /dev/shm. The files are written by hand here: restoring from a copy
is tests/test_memory_tier.py's, the whole path under elastic-run tests/chaos/test_chaos_memory.py's."""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import urllib.error
import urllib.request

import pytest

from elastic.exchange.memory_layout import PIN_FILE, REPLICAS_DIR, REPLICATION_FILE
from checkpoint.io import storage
from checkpoint.io.peer_memory import PeerMemoryFileSystem
from elastic.exchange.memory_layout import TOKEN_HEADER
from elastic.launcher.replica_pull import Peer, Pulled, ReplicaPuller, replicas_wanted, ring_predecessors
from elastic.launcher.replica_server import ReplicaServer, newest_step
from helpers import wait_until

SHM = "/dev/shm"
TOKEN = "the-run-s-secret"


@pytest.fixture
def node_dirs():
    dirs = [tempfile.mkdtemp(prefix="elastic-test-repl-", dir=SHM) for _ in range(2)]
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def commit(directory: str, step: int, *, manifest: bool = True, shard: str = "rank0.safetensors",
           listed: tuple[str, ...] = ("rank0.safetensors",)) -> dict[str, bytes]:
    """A step directory as the memory tier leaves it: this node's shard, then the manifest
    (the commit) listing every node's (`listed`)."""
    files = {shard: os.urandom(3000) + bytes([step])}
    if manifest:
        files["manifest.json"] = json.dumps({"step": step, "files": [{"path": p} for p in listed]}).encode()
    step_dir = os.path.join(directory, f"step_{step:012d}")
    os.makedirs(step_dir)
    for name, data in files.items():
        with open(os.path.join(step_dir, name), "wb") as f:
            f.write(data)
    return files


def get(port: int, path: str, token: str | None = TOKEN) -> bytes:
    headers = {} if token is None else {TOKEN_HEADER: token}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read()


def test_the_server_offers_the_newest_committed_step_and_nothing_outside_step_directories(node_dirs):
    own, _ = node_dirs
    files = commit(own, 3)
    commit(own, 4, manifest=False)  # being written: not offered
    os.makedirs(os.path.join(own, REPLICAS_DIR, "peer", "step_000000000009"))
    server = ReplicaServer("127.0.0.1", own, TOKEN)
    try:
        newest = json.loads(get(server.port, "/newest"))
        assert newest == {"step": 3, "files": {n: len(d) for n, d in files.items()}}
        assert get(server.port, "/step_000000000003/rank0.safetensors") == files["rank0.safetensors"]
        for path in ("/", "/replicas/peer/step_000000000009/manifest.json", "/step_000000000003/../../etc/passwd",
                     "/step_000000000003/.hidden", "/step_3/manifest.json", "/step_000000000005/manifest.json"):
            with pytest.raises(urllib.error.HTTPError) as err:
                get(server.port, path)
            assert err.value.code == 404, path
    finally:
        server.close()


def test_the_server_refuses_a_request_without_the_run_s_token(node_dirs):
    own, _ = node_dirs
    files = commit(own, 3)
    server = ReplicaServer("127.0.0.1", own, TOKEN)
    try:
        for token in (None, "", "the-run-s-secreT", TOKEN + "x"):
            for path in ("/newest", "/held", "/step_000000000003/rank0.safetensors"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    get(server.port, path, token)
                assert err.value.code == 403, (token, path)
        assert get(server.port, "/step_000000000003/rank0.safetensors") == files["rank0.safetensors"]
    finally:
        server.close()
    with pytest.raises(ValueError, match="shared secret"):
        ReplicaServer("127.0.0.1", own, "")


def test_the_puller_keeps_the_newest_copy_of_each_followed_peer_and_drops_a_stale_one(node_dirs):
    own, peer = node_dirs
    server = ReplicaServer("127.0.0.1", peer, TOKEN)
    pulled: queue.Queue[Pulled] = queue.Queue()
    puller = ReplicaPuller(own, pulled.put, TOKEN, every=0.05)
    try:
        with open(os.path.join(own, REPLICATION_FILE), "w") as f:
            json.dump({"replicas": 1}, f)
        first = commit(peer, 3)
        puller.follow([Peer("b", "127.0.0.1", server.port)])
        got = pulled.get(timeout=30)
        assert (got.peer, got.step, got.bytes) == ("b", 3, sum(map(len, first.values())))
        copy = os.path.join(own, REPLICAS_DIR, "b")
        assert os.listdir(copy) == ["step_000000000003"]
        for name, data in first.items():
            with open(os.path.join(copy, "step_000000000003", name), "rb") as f:
                assert f.read() == data, name

        shutil.rmtree(os.path.join(peer, "step_000000000003"))  # the peer's retention after step 5
        second = commit(peer, 5)
        assert pulled.get(timeout=30).step == 5
        assert os.listdir(copy) == ["step_000000000005"], "one copy per peer"
        assert newest_step(copy) == (5, {n: len(d) for n, d in second.items()})

        # A step the agent pinned (its promotion may be copying it) outlives a newer copy.
        with open(os.path.join(own, PIN_FILE), "w") as f:
            f.write("5")
        shutil.rmtree(os.path.join(peer, "step_000000000005"))
        commit(peer, 7)
        assert pulled.get(timeout=30).step == 7
        assert sorted(os.listdir(copy)) == ["step_000000000005", "step_000000000007"]
        os.remove(os.path.join(own, PIN_FILE))

        # The peer left the ring: its copy is dropped once this node commits a newer step (kept
        # until then: tests/chaos/test_chaos_memory.py restores from it after the peer is lost).
        puller.follow([])
        commit(own, 8)
        wait_until("the stale copy to be dropped", lambda: not os.path.exists(copy), 30)
    finally:
        puller.close()
        server.close()


def test_a_peer_s_memory_reads_as_a_filesystem_of_byte_ranges_over_one_kept_alive_connection(node_dirs):
    """What a restore on a node lacking a file uses (checkpoint/io/peer_memory.py): the steps
    the peer holds, own or copied, and the chunks asked for; a vanished peer holds nothing."""
    _, survivor = node_dirs
    both = ("rank0.safetensors", "rank1.safetensors")
    own = commit(survivor, 3, listed=both)
    lost = commit(os.path.join(survivor, REPLICAS_DIR, "lost"), 3, shard="rank1.safetensors", listed=both)
    commit(survivor, 4, manifest=False)  # being written: not offered
    server = ReplicaServer("127.0.0.1", survivor, TOKEN)
    url = f"http://127.0.0.1:{server.port}"
    try:
        loc = storage.Location(PeerMemoryFileSystem(url, TOKEN), url, url)
        assert storage.committed_steps(loc) == [3]
        assert storage.file_sizes(loc, 3) == {n: len(d) for n, d in {**own, **lost}.items()}
        shard = loc.path(3, "rank1.safetensors")  # held in the survivor's copy of the lost node's memory
        assert loc.fs.cat_file(shard, start=10, end=20) == lost["rank1.safetensors"][10:20]
        assert loc.fs.cat_file(shard, start=5, end=5) == b""
        assert loc.fs.cat_file(loc.path(3, "manifest.json")) == own["manifest.json"]
        assert loc.fs.bytes_read == 10, "chunks are counted, the manifest is not"
        assert len(loc.fs._conns) == 1, "one connection for every request of this thread"
        with pytest.raises(OSError, match="416"):
            loc.fs.cat_file(shard, start=10, end=10 ** 6)
        with pytest.raises(FileNotFoundError):
            loc.fs.cat_file(loc.path(3, "rank7.safetensors"), start=0, end=1)
        with pytest.raises(OSError, match="403"):
            PeerMemoryFileSystem(url, "wrong").held()
    finally:
        server.close()
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        loc.fs.cat_file(shard, start=0, end=1)


def test_replicas_come_from_the_memory_tier_s_file_and_the_ring_order():
    assert ring_predecessors(("a", "b", "c", "d"), "a") == ["d", "c", "b"]
    assert ring_predecessors(("a", "b", "c", "d"), "c") == ["b", "a", "d"]
    assert ring_predecessors(("a",), "a") == [] and ring_predecessors(("a", "b"), "z") == []
    with tempfile.TemporaryDirectory(dir=SHM) as d:
        assert replicas_wanted(d) == 0, "no worker said how many: nothing is pulled"
        with open(os.path.join(d, REPLICATION_FILE), "w") as f:
            json.dump({"replicas": 2}, f)
        assert replicas_wanted(d) == 2


def test_the_agents_of_a_run_agree_on_one_random_token_through_etcd(etcd_server, run_id):
    from elastic.rendezvous.etcd_client import EtcdConfig, connect
    from elastic.rendezvous.etcd_state import EtcdBackend

    backends = [EtcdBackend(connect(EtcdConfig(etcd_server.endpoint)), "elastic", run, node)
                for run, node in ((run_id, "a"), (run_id, "b"), (run_id + "-other", "a"))]
    try:
        for backend in backends:
            backend.announce()
            backend.sync()
        first, second, other_run = (b.shared_secret("replica_token") for b in backends)
        assert len(first) == 64 and int(first, 16) >= 0, "32 random bytes, hex"
        assert second == first == backends[0].shared_secret("replica_token"), "created once, then read"
        assert other_run != first, "each run its own"
    finally:
        for backend in backends:
            backend.shutdown()
