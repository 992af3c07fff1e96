"""Simulated nodes in Linux network namespaces, joined by veth links (root and iproute2 only).

    hub namespace: bridge "ctl" (10.201.0.1/24, etcd listens here) and bridge "data" (no address)
    node namespace <n>: veth "ctl" (10.201.0.<k>) into the hub's ctl bridge,
                        veth "data" (10.202.0.<k>) into the hub's data bridge, and lo

Peers talk over the data network (the node's --local-addr: MASTER_ADDR, gloo), agents talk to
etcd over the control network. So `cut(n)` (both links) is a partition, and
`cut(n, control=False)` an asymmetric one: etcd still reachable, peers not. A link is cut by
setting its hub end down: packets are dropped, nothing is reset, as when a cable is pulled.

Everything lives in namespaces of our own (the root namespace gets no interface or route), so
the fixed private address ranges cannot collide with anything, and deleting the namespaces
removes every link. Namespace names start with `elnet<pid>-`, so concurrent runs do not
collide and `sweep_stale()` can remove what a killed test process left behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from elastic.rendezvous.etcd_server import EtcdServer

T = TypeVar("T")

PREFIX = "elnet"
CONTROL_NET = "10.201.0"
DATA_NET = "10.202.0"
HUB_ADDR = f"{CONTROL_NET}.1"
_CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    """Why network-namespace tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _setns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


class Namespace:
    """A network namespace and one thread of ours that lives inside it.

    `call(fn)` runs `fn` on that thread: sockets it opens and processes it starts are in the
    namespace. The thread lives as long as the namespace, so a child started with a
    parent-death signal (etcd) dies when the namespace is torn down, not when `call` returns.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_setns, initargs=(name,))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._thread.submit(fn, *args, **kwargs).result()

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def destroy(self) -> None:
        """Kill every process still inside, stop our thread, delete the namespace."""
        _kill_inside(self.name)
        self._thread.shutdown(wait=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


def _kill_inside(name: str) -> None:
    listed = subprocess.run(["ip", "netns", "pids", name], check=False, capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in listed if int(p) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@dataclass
class Node:
    """One simulated node: its namespace and its addresses on the two networks."""

    name: str
    ns: Namespace
    control_addr: str
    data_addr: str

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.ns.call(fn, *args, **kwargs)


@dataclass
class Cluster:
    """A hub with the control and data bridges, and nodes plugged into both."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**6}")
    nodes: dict[str, Node] = field(default_factory=dict)
    etcd: EtcdServer | None = None

    def __post_init__(self) -> None:
        self.hub = Namespace(f"{self.tag}-hub")
        try:
            for bridge in ("ctl", "data"):
                self.hub.ip("link", "add", bridge, "type", "bridge")
                self.hub.ip("link", "set", bridge, "up")
            self.hub.ip("addr", "add", f"{HUB_ADDR}/24", "dev", "ctl")
            self.hub.ip("link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def start_etcd(self) -> EtcdServer:
        """A real etcd in the hub, listening on the control network only."""
        self.etcd = self.hub.call(EtcdServer(host=HUB_ADDR).start)
        return self.etcd

    def add_node(self, name: str) -> Node:
        host = 10 + len(self.nodes)
        node = Node(name, Namespace(f"{self.tag}-{name}"), f"{CONTROL_NET}.{host}", f"{DATA_NET}.{host}")
        self.nodes[name] = node  # from here on destroy() removes it, whatever fails below
        node.ns.ip("link", "set", "lo", "up")
        for net, addr in (("ctl", node.control_addr), ("data", node.data_addr)):
            port = self._port(name, net)
            self.hub.ip("link", "add", port, "type", "veth", "peer", "name", net, "netns", node.ns.name)
            self.hub.ip("link", "set", port, "master", net)
            self.hub.ip("link", "set", port, "up")
            node.ns.ip("addr", "add", f"{addr}/24", "dev", net)
            node.ns.ip("link", "set", net, "up")
        return node

    @staticmethod
    def _port(node: str, net: str) -> str:
        return f"{net[0]}-{node}"  # the hub end of a node's link

    def cut(self, node: str, *, control: bool = True, data: bool = True) -> float:
        """Pull the node's cables (control and/or data); return the wall time of the cut."""
        at = time.time()
        for net, hit in (("ctl", control), ("data", data)):
            if hit:
                self.hub.ip("link", "set", self._port(node, net), "down")
        return at

    def restore(self, node: str) -> float:
        for net in ("ctl", "data"):
            self.hub.ip("link", "set", self._port(node, net), "up")
        return time.time()

    def destroy(self) -> None:
        """Remove everything: processes in the namespaces, etcd and its data, the namespaces
        (and with them every link and bridge). Safe to call on a half-built cluster."""
        for node in self.nodes.values():
            node.ns.destroy()
        if self.etcd is not None:
            self.hub.call(self.etcd.stop)
        self.hub.destroy()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def sweep_stale() -> list[str]:
    """Delete namespaces left by test processes that no longer exist (killed mid-test)."""
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ", 1)[0]
        owner = name[len(PREFIX):].split("-", 1)[0]
        if name.startswith(PREFIX) and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            removed.append(name)
    return removed
