"""One storage contract, three stores: local disk, memory://, and S3 (moto server + s3fs)."""

from __future__ import annotations

import errno
import os
import uuid

import pytest
import torch

from checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    StorageError,
)
from checkpoint.io import storage


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds an ephemeral port itself, so no other process can take it first.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
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


def test_a_commit_never_replaces_a_manifest_it_did_not_see(store):
    """The create-only put: S3 If-None-Match (moto implements it), an exclusive create in
    memory://, a hard link on local disk."""
    url, options = store
    loc = storage.open_location(url, options)
    storage.commit(loc, 5, '{"first": 1}', replace=False)
    with pytest.raises(StorageError, match=r"step 5 was not committed: .*manifest.json' appeared while"):
        storage.commit(loc, 5, '{"second": 2}', replace=False)
    assert storage.read_bytes(loc, loc.path(5, "manifest.json")) == b'{"first": 1}'
    storage.commit(loc, 5, '{"third": 3}', replace=True)  # a save of a step it saw committed
    assert storage.read_bytes(loc, loc.path(5, "manifest.json")) == b'{"third": 3}'
    assert sorted(storage.file_sizes(loc, 5)) == ["manifest.json"]  # no temp file left behind


def test_newer_round_committing_between_fence_and_put_is_not_overwritten(store):
    """The fence is check-then-act: here a newer round commits step 4 right after the stale
    worker's fence check passed. The stale manifest put must fail, not replace it."""
    url, options = store
    newer = CheckpointManager(url, storage_options=options)

    def fence_then_newer_round_commits():
        newer.save(4, {"x": torch.full((3,), 2.0)})
        newer.wait()

    stale = CheckpointManager(url, storage_options=options, commit_guard=fence_then_newer_round_commits)
    with pytest.raises(CheckpointError, match="appeared while this save was committing"):
        stale.save(4, {"x": torch.full((3,), 1.0)})
        stale.wait()
    target = {"x": torch.zeros(3)}
    assert CheckpointManager(url, storage_options=options).load(target) == 4
    assert target["x"].tolist() == [2.0] * 3


def test_local_commit_on_a_filesystem_without_hard_links_renames(tmp_path, monkeypatch):
    """vfat and some FUSE mounts refuse link(2) with EPERM: the commit renames instead."""

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    loc = storage.open_location(str(tmp_path / "ckpt"))
    storage.commit(loc, 1, '{"only": 1}', replace=False)
    assert storage.read_bytes(loc, loc.path(1, "manifest.json")) == b'{"only": 1}'
    assert sorted(os.listdir(loc.step_dir(1))) == ["manifest.json"]
