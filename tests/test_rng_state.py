"""RNG capture/restore: every stream round-trips through JSON; CUDA is touched only when used."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from elastic.worker.rng_state import RngState, TorchStreams


def draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(2).tolist(),
            np.random.standard_normal())


def test_every_stream_round_trips_through_json():
    random.gauss(0, 1)  # leaves a cached second normal (gauss_next) in Python's state
    np.random.standard_normal()  # and in NumPy's legacy state (has_gauss)
    saved = json.loads(json.dumps(RngState.capture().to_json()))
    expected = draws()
    RngState.from_json(saved).restore("test")
    assert draws() == expected


def test_without_cuda_nothing_cuda_is_touched(monkeypatch):
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")

    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA RNG function was called")

    for name in ("get_rng_state_all", "get_rng_state", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    state = RngState.capture()
    assert state.torch_streams.cuda == () and state.to_json()["cuda"] == []
    RngState.from_json(state.to_json()).restore("test")
    assert not torch.cuda.is_initialized()


def test_cuda_states_are_captured_and_restored_per_device(monkeypatch):
    """The CUDA branch, run on CPU with torch.cuda's generator calls replaced by recorders."""
    devices = [torch.arange(16, dtype=torch.uint8) + d for d in range(2)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state}))
    record = json.loads(json.dumps(RngState.capture().to_json()))
    assert record["cuda"] == [d.tolist() for d in devices]
    RngState.from_json(record).restore("test")
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[d], devices[d]) for d in range(2))


def test_cuda_states_on_a_machine_without_cuda_restore_the_rest_and_warn():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    record = RngState.capture().to_json()
    record["cuda"] = [list(range(16)), list(range(16))]
    expected = draws()
    with pytest.warns(RuntimeWarning, match=r"step 4 holds CUDA RNG states for 2 devices, this "
                      r"process has 0: the CPU, Python and NumPy streams are restored, the CUDA "
                      r"streams of devices 0\.\.1 are not"):
        RngState.from_json(record).restore("the checkpoint of step 4")
    assert draws() == expected
    assert not torch.cuda.is_initialized()


def test_loop_checkpoint_with_cuda_states_resumes_on_cpu(tmp_path, monkeypatch):
    """A checkpoint written by a (simulated) CUDA run resumes here: CPU streams bitwise, a warning."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from test_train_loop import run_with_checkpoints

    full, _ = run_with_checkpoints(tmp_path / "a", max_steps=6)
    real_capture = TorchStreams.capture
    with monkeypatch.context() as patch:
        patch.setattr(TorchStreams, "capture", classmethod(
            lambda cls: dataclasses.replace(real_capture(), cuda=(torch.zeros(16, dtype=torch.uint8),))))
        run_with_checkpoints(tmp_path / "b", max_steps=6, stop_at=3)
    with pytest.warns(RuntimeWarning, match="checkpoint of step 2 holds CUDA RNG states for 1 devices"):
        resumed, _ = run_with_checkpoints(tmp_path / "b", max_steps=6)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
