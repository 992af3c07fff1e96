"""Durability of the local commit, from the order of the filesystem calls a save makes.

A new directory entry (a directory made, a file renamed or linked into place) survives a
power cut only once the directory holding it is fsynced. A recorder wraps the primitives
(os.mkdir, os.rename, os.replace, os.link, os.fsync, os.unlink, os.remove, os.rmdir,
shutil.rmtree) and checks, at every deletion and when the save returns, that every entry
made so far is durable: otherwise a power cut after retention deleted the old checkpoints
could lose the new one too. (LazyFS, which would drop the unsynced entries for real, is
not available here; the recorder checks the same rule from the call order.)
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from checkpoint import CheckpointManager


class Recorder:
    """The entries not yet durable (directory -> what made an entry in it), checked at each deletion."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pending: dict[str, str] = {}
        self.log: list[str] = []
        self.violations: list[str] = []
        self._lock = threading.Lock()
        for name, record in [("mkdir", self._made), ("rename", self._moved), ("replace", self._moved),
                             ("link", self._moved), ("fsync", self._fsync), ("unlink", self._deleted),
                             ("remove", self._deleted), ("rmdir", self._deleted)]:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), name, record))
        monkeypatch.setattr(shutil, "rmtree", self._wrap(shutil.rmtree, "rmtree", self._deleted))

    def _wrap(self, original, name, record):
        def call(*args, **kwargs):
            if record == self._deleted:
                record(name, *args, **kwargs)  # judged before it happens
                return original(*args, **kwargs)
            result = original(*args, **kwargs)  # an entry counts once made (mkdir of an existing directory fails)
            record(name, *args, **kwargs)
            return result
        return call

    def _made(self, name, path, *_, **__):
        path = os.path.abspath(path)
        with self._lock:
            self.log.append(f"mkdir {path}")
            self.pending[os.path.dirname(path)] = f"mkdir {path}"

    def _moved(self, name, src, dst, *_, **__):
        dst = os.path.abspath(dst)
        with self._lock:
            self.log.append(f"{name} {src} -> {dst}")
            self.pending[os.path.dirname(dst)] = f"{name} -> {dst}"

    def _fsync(self, name, fd, *_):
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        with self._lock:
            self.log.append(f"fsync {path}")
            self.pending.pop(path, None)

    def _deleted(self, name, path, *_, **kwargs):
        with self._lock:
            self.log.append(f"{name} {path}")
            if self.pending:
                self.violations.append(f"{name} {path} while not yet durable: {sorted(self.pending.values())}")

    def check_all_durable(self) -> None:
        assert not self.violations, "\n".join(self.violations + ["calls:"] + self.log)
        assert not self.pending, f"save returned with entries not durable: {self.pending}\n" + "\n".join(self.log)


@pytest.mark.parametrize("with_tensors", [True, False], ids=["shards", "json-only"])
def test_commit_is_durable_before_retention_deletes(tmp_path, monkeypatch, with_tensors):
    root = tmp_path / "new" / "parents" / "ckpt"  # the first save creates all three
    (tmp_path / "new").mkdir()  # ...two of them: "new" exists, so its parent's entry is not ours
    recorder = Recorder(monkeypatch)
    with CheckpointManager(root, keep_last=1) as ckpt:
        for step in (1, 2, 3):
            state = {"meta": {"step": step}}
            if with_tensors:
                state["w"] = torch.full((1000,), float(step))
            ckpt.save(step, state)
            ckpt.wait()
            recorder.check_all_durable()
        assert ckpt.steps() == [3]
    log = "\n".join(recorder.log)
    assert f"fsync {tmp_path / 'new'}" in log and f"fsync {root.parent}" in log and f"fsync {root}" in log, log
    deletions = [line for line in recorder.log if line.startswith(("rmtree", "remove", "unlink", "rmdir"))]
    assert any(str(root / "step_000000000001") in line for line in deletions), log  # retention did run
