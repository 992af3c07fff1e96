"""Reachability probes (elastic/rendezvous/reachability.py) and which interface holds an address
(elastic/host/net.py): what lets a node with several networks work and be judged fairly."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from helpers import SCRIPTS

from elastic.host.net import free_port, interface_of
from elastic.launcher.config import LaunchConfig
from elastic.rendezvous.settings import RendezvousSettings
from elastic.rendezvous.reachability import Prober, ProbeListener, probe_targets, unreachable
from elastic.launcher.worker_group import worker_env
from elastic.rendezvous.protocol import Assignment


def test_listener_answers_and_a_closed_port_still_proves_the_path():
    listener = ProbeListener("127.0.0.1")
    try:
        # A port nobody listens on answers with a reset: the host is reachable.
        targets = {"up": ("127.0.0.1", listener.port), "refused": ("127.0.0.1", free_port())}
        assert unreachable(targets, timeout=2.0) == []
    finally:
        listener.close()


def test_a_peer_that_never_answers_is_unreachable_within_the_timeout():
    # A listener whose accept queue is full drops the next SYNs, as a cut link does.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for sock in fillers:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        try:
            started = time.monotonic()
            answered = unreachable({"x": ("127.0.0.1", port)}, timeout=0.3)
            took = time.monotonic() - started
        finally:
            for sock in fillers:
                sock.close()
    if answered == []:
        pytest.skip("this kernel answered beyond the accept queue: no black hole to probe")
    assert answered == ["x"] and took < 2.0


class _Peer:
    """A listener that never accepts: each probe that reached it waits in its accept queue,
    so a test can count probes without racing a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.target = ("127.0.0.1", self.sock.getsockname()[1])

    def probed(self, timeout: float = 0.0) -> int:
        """How many probes arrived (waiting up to `timeout` for the first)."""
        count = 0
        self.sock.settimeout(timeout)
        try:
            while True:
                self.sock.accept()[0].close()
                count += 1
                self.sock.setblocking(False)
        except (BlockingIOError, TimeoutError):
            return count

    def close(self) -> None:
        self.sock.close()


def test_prober_verifies_expected_peers_in_the_background_and_the_check_skips_them():
    peer, other = _Peer(), _Peer()
    prober = Prober(timeout=2.0, fresh_for=60.0)
    try:
        prober.expect({"a": peer.target})
        assert peer.probed(timeout=10.0) == 1  # the background thread reached it...
        deadline = time.monotonic() + 10.0
        while prober.unverified({"a": peer.target}) and time.monotonic() < deadline:
            time.sleep(0.005)  # ...and records the answer once its connect returned
        assert prober.unverified({"a": peer.target}) == {}
        # The check once the round seals probes only the peer it has not verified.
        assert prober.unreachable({"a": peer.target, "b": other.target}) == []
        assert (peer.probed(), other.probed()) == (0, 1)
        # After a failure everything is probed afresh.
        prober.forget()
        assert prober.unreachable({"a": peer.target}) == [] and peer.probed() == 1
    finally:
        prober.close()
        peer.close()
        other.close()


def test_prober_verification_expires_after_its_lifetime():
    now = [0.0]
    peer = _Peer()
    prober = Prober(timeout=2.0, fresh_for=5.0, clock=lambda: now[0])
    try:
        assert prober.unreachable({"a": peer.target}) == [] and peer.probed() == 1
        now[0] = 4.9
        assert prober.unreachable({"a": peer.target}) == [] and peer.probed() == 0
        now[0] = 5.0
        assert prober.unreachable({"a": peer.target}) == [] and peer.probed() == 1
    finally:
        prober.close()
        peer.close()


def test_prober_does_not_remember_a_peer_that_did_not_answer():
    # No TCP connection can go to the broadcast address: connect() fails at once.
    prober = Prober(timeout=0.3, fresh_for=60.0)
    try:
        assert prober.unreachable({"x": ("255.255.255.255", 9)}) == ["x"]
        assert prober.unreachable({"x": ("255.255.255.255", 9)}) == ["x"]
    finally:
        prober.close()


def test_probe_targets_are_the_first_node_and_ring_neighbours():
    nodes = [f"n{i}" for i in range(10)]
    assert probe_targets(nodes, "n5") == ["n0", "n3", "n4", "n6", "n7"]
    assert probe_targets(nodes, "n0") == ["n1", "n2", "n8", "n9"]  # wraps around
    assert probe_targets(nodes, "spare") == ["n0", "n1", "n8", "n9"]  # as if appended last
    assert probe_targets(nodes[:3], "n1") == ["n0", "n2"]  # small rounds: every peer
    # Every node is probed by its 2 x RING_NEIGHBOURS ring neighbours (so a node cut off
    # from everyone is seen from both ends), and the first node by everyone.
    probed_by = {n: [m for m in nodes if n in probe_targets(nodes, m)] for n in nodes}
    assert all(len(probed_by[n]) == 4 for n in nodes[1:]) and len(probed_by["n0"]) == 9


def test_interface_of_finds_the_interface_holding_an_address():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("not-an-address") is None
    listed = subprocess.run(["ip", "-o", "-4", "addr"], check=False, capture_output=True, text=True).stdout.split("\n")
    for line in filter(None, listed):  # every IPv4 address of this host maps back to its interface
        fields = line.split()
        assert interface_of(fields[3].split("/")[0]) == fields[1]


def _assignment(local_addr: str) -> Assignment:
    return Assignment(round=0, group_rank=0, num_nodes=1, world_size=1, rank_offset=0, master_addr=local_addr,
                      master_port=1, restart_count=0, local_addr=local_addr)


def test_workers_bind_gloo_and_nccl_to_the_interface_peers_reach_this_node_at(tmp_path, monkeypatch):
    config = LaunchConfig(entrypoint=f"{SCRIPTS}/rdzv_worker.py", args=(), rdzv=RendezvousSettings())
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    env = worker_env(config, _assignment("127.0.0.1"), 0, str(tmp_path), "127.0.0.1:2379", "a")
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["NCCL_SOCKET_IFNAME"] == "=lo"
    # an address on no local interface (translated on the way in): gloo's own choice stands
    assert "GLOO_SOCKET_IFNAME" not in worker_env(config, _assignment("203.0.113.9"), 0, str(tmp_path), "x:1", "a")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's settings win
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker")
    env = worker_env(config, _assignment("127.0.0.1"), 0, str(tmp_path), "x:1", "a")
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("eth7", "^docker")


def test_rdzv_conf_takes_outage_and_probe_timeouts():
    settings = RendezvousSettings.parse("outage_timeout=90,probe_timeout=0.5")
    assert (settings.outage_timeout, settings.probe_timeout) == (90.0, 0.5)
