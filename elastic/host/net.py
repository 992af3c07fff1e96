"""Address helpers: which address peers reach this node at, which interface holds it, free ports."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller must tolerate losing a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def outgoing_addr(remote_host: str, remote_port: int) -> str:
    """The local address the kernel would use to reach `remote_host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(remote_host), remote_port))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def interface_of(addr: str) -> str | None:
    """The name of the local network interface that holds address `addr` (None: no such
    interface here, e.g. a host name or an address translated on the way in)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6:
        return _ipv6_interfaces().get(ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def _ipv6_interfaces() -> dict[ipaddress.IPv6Address, str]:
    """Linux lists IPv6 addresses as 'hexaddr ifindex prefixlen scope flags name' lines."""
    try:
        with open("/proc/net/if_inet6") as f:
            rows = [line.split() for line in f]
    except OSError:
        return {}
    return {ipaddress.IPv6Address(int(row[0], 16)): row[5] for row in rows if len(row) == 6}
