"""Corruption is detected with an error naming the file; load() of "latest" falls back."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from checkpoint import CheckpointCorruptError, CheckpointManager, CheckpointNotFoundError


def save_steps(root, steps=(1, 2)) -> dict[int, torch.Tensor]:
    values = {}
    with CheckpointManager(root) as ckpt:
        for step in steps:
            values[step] = torch.arange(1000, dtype=torch.float32) * step
            ckpt.save(step, {"w": values[step], "b": torch.ones(3, dtype=torch.int64) * step, "n": step})
    return values


def shard_of(root, step) -> str:
    d = os.path.join(root, f"step_{step:012d}")
    (name,) = [p for p in os.listdir(d) if p.endswith(".safetensors")]
    return os.path.join(d, name)


def manifest_of(root, step) -> str:
    return os.path.join(root, f"step_{step:012d}", "manifest.json")


def target():
    return {"w": torch.zeros(1000), "b": torch.zeros(3, dtype=torch.int64), "n": None}


def test_flipped_byte_is_detected_and_latest_falls_back(tmp_path):
    values = save_steps(tmp_path)
    path = shard_of(tmp_path, 2)
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)  # inside the data of "w"
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"{path}: chunk 'w' .* has checksum crc32:\w+, the manifest says"):
        ckpt.load(target(), step=2)
    with pytest.raises(CheckpointCorruptError, match="chunk 'w'"):
        ckpt.verify(2)
    state = target()
    with pytest.warns(RuntimeWarning, match=r"step 2 .* cannot be loaded .*falling back"):
        assert ckpt.load(state) == 1
    assert torch.equal(state["w"], values[1]) and state["n"] == 1


def test_flipped_header_byte_is_found_by_verify(tmp_path):
    save_steps(tmp_path, steps=(1,))
    path = shard_of(tmp_path, 1)
    with open(path, "r+b") as f:
        f.seek(12)
        byte = f.read(1)
        f.seek(12)
        f.write(bytes([byte[0] ^ 0x20]))
    with pytest.raises(CheckpointCorruptError, match=rf"{path}: header has checksum"):
        CheckpointManager(tmp_path).verify()


def test_truncated_shard(tmp_path):
    save_steps(tmp_path)
    path = shard_of(tmp_path, 2)
    size = os.path.getsize(path)
    os.truncate(path, size - 10)
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"{path} has {size - 10} bytes, the manifest says {size}"):
        ckpt.load(target(), step=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert ckpt.load(target()) == 1


def test_missing_shard(tmp_path):
    save_steps(tmp_path)
    path = shard_of(tmp_path, 2)
    os.remove(path)
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"shard file {path} is missing"):
        ckpt.load(target(), step=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert ckpt.load(target()) == 1


def test_shard_dropped_from_manifest_is_incomplete(tmp_path):
    """Where DCP's safetensors reader 'succeeds' without a shard, the coverage check refuses."""
    save_steps(tmp_path, steps=(1,))
    path = manifest_of(tmp_path, 1)
    raw = json.loads(open(path).read())
    raw["tensors"]["w"]["chunks"] = []
    open(path, "w").write(json.dumps(raw))
    with pytest.raises(CheckpointCorruptError, match="chunks of tensor .w. do not tile it exactly once: the chunks cover 0 of 1000 elements"):
        CheckpointManager(tmp_path).load(target(), step=1)


def test_missing_manifest_means_not_committed(tmp_path):
    save_steps(tmp_path)
    os.remove(manifest_of(tmp_path, 2))
    ckpt = CheckpointManager(tmp_path)
    assert ckpt.steps() == [1] and ckpt.latest() == 1
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*committed: \[1\]"):
        ckpt.load(target(), step=2)
    with pytest.raises(CheckpointNotFoundError, match=rf"{manifest_of(tmp_path, 2)} does not exist"):
        ckpt.manifest(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncommitted leftover is not worth a warning
        assert ckpt.load(target()) == 1


def test_garbled_manifest(tmp_path):
    save_steps(tmp_path)
    path = manifest_of(tmp_path, 2)
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"{path}: manifest is not valid JSON"):
        ckpt.load(target(), step=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert ckpt.load(target()) == 1


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    save_steps(tmp_path, steps=(1,))
    os.remove(shard_of(tmp_path, 1))
    with pytest.warns(RuntimeWarning):
        with pytest.raises(CheckpointCorruptError, match="no committed checkpoint .* could be loaded: step 1"):
            CheckpointManager(tmp_path).load(target())


def test_verify_passes_on_a_good_checkpoint(tmp_path):
    save_steps(tmp_path)
    assert CheckpointManager(tmp_path).verify() == 2
