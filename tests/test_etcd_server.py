"""The private etcd launcher and the etcd client module, against a real server."""

from __future__ import annotations

import time

import pytest

from elastic.errors import ConfigError, RendezvousConnectionError
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.host.net import free_port
from elastic.rendezvous.etcd_server import EtcdServer


def test_server_starts_serves_and_cleans_up():
    server = EtcdServer().start()
    data_dir = server.data_dir
    try:
        client = connect(EtcdConfig(server.endpoint))
        client.put("/k", "v")
        assert client.get("/k")[0] == b"v"
        client.close()
    finally:
        server.stop()
    import os

    assert not os.path.exists(data_dir)


def test_restart_keeps_data(private_etcd):
    client = connect(EtcdConfig(private_etcd.endpoint))
    client.put("/kept", "1")
    client.close()
    private_etcd.restart()
    client = connect(EtcdConfig(private_etcd.endpoint))
    assert client.get("/kept")[0] == b"1"
    client.close()


def test_unreachable_endpoint_fails_fast_with_clear_error():
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=r"cannot reach etcd at 127\.0\.0\.1:\d+"):
        connect(EtcdConfig(f"127.0.0.1:{free_port()}", timeout=1.0))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("endpoint", ["localhost", "host:", ":2379", "host:99999", "host:abc"])
def test_bad_endpoint_is_a_config_error(endpoint):
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        EtcdConfig(endpoint)
