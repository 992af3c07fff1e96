"""One storage contract, three stores: local disk, memory://, and S3 (moto server + s3fs)."""

from __future__ import annotations

import socket
import uuid

import pytest
import torch

from checkpoint import CheckpointManager, CheckpointNotFoundError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._port}"
    finally:
        server.stop()


@pytest.fixture(params=["file", "memory", "s3"])
def store(request, tmp_path):
    """(url, storage_options) with a root of this test's own."""
    if request.param == "file":
        return str(tmp_path / "ckpt"), None
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}", None
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run", options


def test_round_trip_retention_and_leftovers(store):
    url, options = store
    model = torch.nn.Linear(6, 4)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6)).sum().backward()
    optim.step()
    with CheckpointManager(url, keep_last=2, storage_options=options) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, {"model": model, "optim": optim, "step": step})
        ckpt.wait()
        assert ckpt.steps() == [2, 3]
        expected = {k: v.clone() for k, v in model.state_dict().items()}

    # An uncommitted leftover (shards, no manifest) is invisible to readers.
    fs = ckpt._loc.fs
    fs.makedirs(f"{ckpt._loc.root}/step_000000000007", exist_ok=True)
    fs.pipe_file(f"{ckpt._loc.root}/step_000000000007/rank00000-x.safetensors", b"partial")

    fresh = torch.nn.Linear(6, 4)
    fresh_optim = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = {"model": fresh, "optim": fresh_optim, "step": None}
    with CheckpointManager(url, keep_last=2, storage_options=options) as ckpt:
        assert ckpt.latest() == 3
        assert ckpt.load(state) == 3 and state["step"] == 3
        assert ckpt.verify(3) == 3
        with pytest.raises(CheckpointNotFoundError):
            ckpt.load(state, step=7)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert torch.equal(fresh_optim.state_dict()["state"][0]["momentum_buffer"],
                       optim.state_dict()["state"][0]["momentum_buffer"])


def test_corrupt_latest_falls_back(store):
    url, options = store
    with CheckpointManager(url, storage_options=options) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": torch.full((100,), float(step))})
        ckpt.wait()
        m = ckpt.manifest(2)
        path = ckpt._loc.path(2, m.files[0].path)
        data = bytearray(ckpt._loc.fs.cat_file(path))
        data[-1] ^= 0xFF
        ckpt._loc.fs.pipe_file(path, bytes(data))
        state = {"x": torch.zeros(100)}
        with pytest.warns(RuntimeWarning, match=f"step 2 .*{m.files[0].path}.*checksum"):
            assert ckpt.load(state) == 1
        assert torch.equal(state["x"], torch.ones(100))
