"""Reachability probes (elastic/reachability.py) and which interface holds an address
(elastic/_net.py): what lets a node with several networks work and be judged fairly."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from helpers import SCRIPTS

from elastic._net import free_port, interface_of
from elastic.launch_config import LaunchConfig, RendezvousSettings
from elastic.reachability import ProbeListener, probe_targets, unreachable
from elastic.workers import Assignment, worker_env


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
