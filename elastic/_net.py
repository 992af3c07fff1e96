"""Address helpers: which address peers reach this node at, and free ports."""

from __future__ import annotations

import socket


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
