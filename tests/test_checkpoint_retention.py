"""Retention: the pure policy (table + properties) and the manager applying it to storage."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint import CheckpointManager
from checkpoint.retention import CheckpointInfo, RetentionPolicy, decide, rank_best

NAN = float("nan")


def kept(metrics: list[float | None], **policy) -> list[int]:
    infos = [CheckpointInfo(step, {} if m is None else {"loss": m}) for step, m in enumerate(metrics, 1)]
    return [i.step for i, k in zip(infos, decide(infos, RetentionPolicy(metric="loss", **policy))) if k]


@pytest.mark.parametrize(
    "metrics, policy, expected",
    [
        ([5, 4, 3, 2, 1], dict(keep_last=2), [4, 5]),
        ([1, 2, 3, 4, 5], dict(keep_last=1, keep_best=2), [1, 2, 5]),
        ([1, 2, 3, 4, 5], dict(keep_last=1, keep_best=2, mode="max"), [4, 5]),
        ([NAN, NAN, NAN], dict(keep_last=1, keep_best=2), [3]),  # NaN is never best
        ([1, NAN, 3, NAN], dict(keep_last=1, keep_best=1), [1, 4]),  # newest kept even if NaN
        ([2, 2, 2, 9], dict(keep_last=1, keep_best=2), [2, 3, 4]),  # ties prefer the newer
        ([None, 3, None], dict(keep_last=1, keep_best=3), [2, 3]),  # a missing metric is not best
        ([float("inf"), 1], dict(keep_last=1, keep_best=1, mode="max"), [1, 2]),
        ([5, 4, 3], dict(keep_best=1), [3]),  # keep_last unset: the newest still stays
        ([5, 4, 3], dict(), [1, 2, 3]),  # nothing set: keep everything
    ],
)
def test_policy_table(metrics, policy, expected):
    assert kept(metrics, **policy) == expected


def test_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match="keep_last=0 must be at least 1"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValueError, match="keep_best=2 needs metric"):
        RetentionPolicy(keep_best=2)
    with pytest.raises(ValueError, match="mode='best' must be 'min' or 'max'"):
        RetentionPolicy(mode="best")


metric_values = st.one_of(st.none(), st.just(NAN), st.sampled_from([0.0, 1.0, 1.0, 2.0]), st.floats(-5, 5))


@settings(max_examples=300, deadline=None)
@given(
    metrics=st.lists(metric_values, min_size=1, max_size=25),
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_best=st.one_of(st.none(), st.integers(0, 4)),
    mode=st.sampled_from(["min", "max"]),
    order=st.randoms(use_true_random=False),
)
def test_policy_properties(metrics, keep_last, keep_best, mode, order):
    infos = [CheckpointInfo(step, {} if m is None else {"loss": m}) for step, m in enumerate(metrics, 1)]
    order.shuffle(infos)  # the decision does not depend on listing order
    policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric="loss", mode=mode)
    flags = dict(zip((i.step for i in infos), decide(infos, policy)))
    newest = len(metrics)
    assert flags[newest], "the newest committed checkpoint is never deleted"
    if policy.keeps_everything:
        assert all(flags.values())
        return
    for step in range(max(1, newest - (keep_last or 1) + 1), newest + 1):
        assert flags[step], f"step {step} is among the keep_last={keep_last} newest"
    assert sum(flags.values()) <= (keep_last or 1) + (keep_best or 0)
    best = rank_best(infos, "loss", mode)
    assert all(not math.isnan(metrics[s - 1]) for s in best), "NaN is never ranked"
    for step in best[: keep_best or 0]:
        assert flags[step]
    sign = 1 if mode == "min" else -1
    finite = [(sign * metrics[s - 1], s) for s in best]
    for (va, sa), (vb, sb) in zip(finite, finite[1:]):
        assert va < vb or (va == vb and sa > sb), "best first, ties prefer the newer step"
    # A step that is neither recent nor best is deleted.
    recent = set(range(newest - (keep_last or 1) + 1, newest + 1))
    for step, keep in flags.items():
        if step not in recent and step not in best[: keep_best or 0]:
            assert not keep


# ----------------------------------------------------------------------- applied to storage


def test_manager_retains_from_storage(tmp_path):
    losses = {1: 0.5, 2: 0.1, 3: NAN, 4: 0.7, 5: 0.3, 6: 0.9}
    with CheckpointManager(tmp_path, keep_last=2, keep_best=2, metric="loss") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"x": torch.tensor([float(step)])}, metrics={"loss": losses[step]})
        ckpt.wait()
        assert ckpt.steps() == [1, 2, 3] and ckpt.best() == [2, 1]
    # A restart (new manager) and a leftover of a crashed save both behave.
    os.makedirs(tmp_path / "step_000000000099")
    (tmp_path / "step_000000000099" / "rank00000-dead.safetensors").write_bytes(b"partial")
    with CheckpointManager(tmp_path, keep_last=2, keep_best=2, metric="loss") as ckpt:
        for step in (4, 5, 6):
            ckpt.save(step, {"x": torch.tensor([float(step)])}, metrics={"loss": losses[step]})
        ckpt.wait()
        assert ckpt.steps() == [2, 5, 6]
        assert ckpt.best() == [2, 5]
    assert not (tmp_path / "step_000000000099").exists()


def test_pruning_leaves_a_step_being_promoted_alone_until_its_marker_is_stale(tmp_path):
    """A save at breakpoint copies into an uncommitted step while the next round commits and
    prunes (checkpoint/promote.py): its fresh marker keeps the step; a crashed promotion's stale
    marker does not, and a plain leftover goes at once."""
    from checkpoint.io import storage

    loc = storage.open_location(str(tmp_path))
    marker = storage.mark_promoting(loc, 5)
    (tmp_path / "step_000000000005" / "rank00000-copy.safetensors").write_bytes(b"being copied")
    os.makedirs(tmp_path / "step_000000000006")
    (tmp_path / "step_000000000006" / "rank00000-dead.safetensors").write_bytes(b"partial")
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        ckpt.save(7, {"x": torch.zeros(1)})
        ckpt.wait()  # the commit's retention ran
        assert (tmp_path / "step_000000000005" / "rank00000-copy.safetensors").exists()
        assert not (tmp_path / "step_000000000006").exists()
        with open(marker, "w") as f:  # as a promotion that crashed PROMOTING_FRESH seconds ago left it
            f.write(repr(time.time() - storage.PROMOTING_FRESH - 1))
        assert ckpt.prune() == [5]
    assert not (tmp_path / "step_000000000005").exists()


def test_older_step_saved_last_is_not_deleted(tmp_path):
    """Never delete the checkpoint just written, even when its step is older than others."""
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        ckpt.save(10, {"x": torch.zeros(1)})
        ckpt.save(5, {"x": torch.ones(1)})
        ckpt.wait()
        assert ckpt.steps() == [5, 10]


def test_copied_directory_uses_its_manifests(tmp_path):
    import shutil

    with CheckpointManager(tmp_path / "a", keep_best=1, metric="acc", mode="max") as ckpt:
        for step, acc in ((1, 0.9), (2, 0.2)):
            ckpt.save(step, {"x": torch.zeros(1)}, metrics={"acc": acc})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with CheckpointManager(tmp_path / "b", keep_best=1, metric="acc", mode="max") as ckpt:
        assert ckpt.best() == [1]
        ckpt.save(3, {"x": torch.zeros(1)}, metrics={"acc": 0.5})
        ckpt.wait()
        assert ckpt.steps() == [1, 3]


def test_retention_never_prunes_another_runs_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "old-run")
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": torch.zeros(1)})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "new-run")
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        assert ckpt.load({"x": torch.ones(1)}) == 2  # resume from the other run is fine
        for step in (3, 4):
            ckpt.save(step, {"x": torch.zeros(1)})
        ckpt.wait()
        assert ckpt.steps() == [2, 4]


def test_prune_dry_run_and_all_runs(tmp_path, monkeypatch):
    """What the CLI's `prune` needs: the same decision, as a dry run, across runs."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a")
    with CheckpointManager(tmp_path) as ckpt:  # keeps everything while saving
        for step in (1, 2, 3):
            ckpt.save(step, {"x": torch.zeros(1)}, metrics={"loss": float(step)})
    os.makedirs(tmp_path / "step_000000000009")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    pruner = CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="loss")
    assert pruner.prune(dry_run=True) == [9]  # run "a" is not ours: only the leftover
    assert pruner.prune(dry_run=True, all_runs=True) == [2, 9]
    assert pruner.steps() == [1, 2, 3] and (tmp_path / "step_000000000009").exists()
    assert pruner.prune(all_runs=True) == [2, 9]
    assert pruner.steps() == [1, 3] and not (tmp_path / "step_000000000009").exists()


# ----------------------------------------------------------------------- damaged checkpoints


def test_policy_never_counts_or_deletes_damaged():
    infos = [CheckpointInfo(1, {"loss": 0.5}), CheckpointInfo(2, {"loss": 0.1}, damaged=True)]
    assert decide(infos, RetentionPolicy(keep_last=1)) == [True, True]
    assert rank_best(infos, "loss", "min") == [1]  # a damaged checkpoint is never best
    infos.append(CheckpointInfo(3, {"loss": 0.9}))
    assert decide(infos, RetentionPolicy(keep_last=1)) == [False, True, True]


def _damage(root, step: int, how: str) -> None:
    d = root / f"step_{step:012d}"
    (shard,) = d.glob("*.safetensors")
    if how == "delete":
        shard.unlink()
    elif how == "truncate":
        os.truncate(shard, shard.stat().st_size - 10)
    else:  # flip one data byte: same size, so only reading finds it
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_damaged_newest_never_costs_the_last_good_checkpoint(tmp_path, how, capsys):
    from checkpoint.cli.commands import main

    with CheckpointManager(tmp_path) as ckpt:  # keeps everything while saving
        for step in (1, 2):
            ckpt.save(step, {"x": torch.full((1000,), float(step))})
    _damage(tmp_path, 2, how)
    seen_by_listing = how != "flip"
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows[2]["status"] == ("corrupt" if seen_by_listing else "committed")
    assert rows[1 if seen_by_listing else 2]["latest"]

    # The CLI's prune applies the same policy: the good step 1 stays, damaged step 2 too.
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert (tmp_path / "step_000000000001" / "manifest.json").exists()
    ckpt = CheckpointManager(tmp_path, keep_last=1)
    assert ckpt.latest() == (1 if seen_by_listing else 2)
    assert ckpt.prune() == [] and ckpt.steps() == [1, 2]

    state = {"x": torch.zeros(1000)}
    with pytest.warns(RuntimeWarning, match="step 2 .* cannot be loaded"):
        assert ckpt.load(state) == 1
    assert torch.equal(state["x"], torch.full((1000,), 1.0))
    # Found corrupt while loading: no longer the protected newest, whatever the listing says.
    assert ckpt.latest() == 1
    assert ckpt.prune() == [] and ckpt.steps() == [1, 2]

    # A newer good checkpoint becomes the resume point; step 1 may go, damaged step 2 stays.
    ckpt.save(3, {"x": torch.full((1000,), 3.0)})
    ckpt.wait()
    assert ckpt.steps() == [2, 3] and ckpt.latest() == 3
    assert ckpt.load(state) == 3 and torch.equal(state["x"], torch.full((1000,), 3.0))
    ckpt.close()


def test_retention_runs_after_the_commit_outcome(tmp_path):
    # The listener runs once every rank has the outcome: retention must not have run yet
    # (before, rank 0 pruned before broadcasting, on the path every rank waits on).
    seen = {}
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        ckpt.set_commit_listener(lambda step, held, tier: seen.setdefault(step, CheckpointManager(tmp_path).steps()))
        for step in (1, 2):
            ckpt.save(step, {"w": torch.ones(3)})
        ckpt.wait()
        assert ckpt.steps() == [2]
    assert seen == {1: [1], 2: [1, 2]}


def test_retention_reads_each_committed_manifest_once(tmp_path, monkeypatch):
    from checkpoint.io import storage

    with CheckpointManager(tmp_path) as ckpt:
        for step in range(10):
            ckpt.save(step, {"w": torch.ones(3)}, metrics={"loss": float(step)})
    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda loc, path: reads.append(path) or real(loc, path))
    with CheckpointManager(tmp_path, keep_last=20) as ckpt:
        for step in range(10, 15):
            ckpt.save(step, {"w": torch.ones(3)}, metrics={"loss": float(step)})
    manifests = [p for p in reads if p.endswith("manifest.json")]
    assert sorted(manifests) == sorted(set(manifests)) and len(manifests) == 10, manifests


def test_manifest_cache_follows_recommits_and_deletions(tmp_path):
    with CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss") as ckpt:
        ckpt.save(1, {"w": torch.ones(3)}, metrics={"loss": 5.0})
        ckpt.save(2, {"w": torch.ones(3)}, metrics={"loss": 1.0})
        ckpt.wait()
        assert ckpt.best() == [2]
        ckpt.save(2, {"w": torch.ones(3)}, metrics={"loss": 9.0})  # saved again: a new manifest
        ckpt.wait()
        assert ckpt.manifest(2).metrics == {"loss": 9.0} and ckpt.best() == [1]
        CheckpointManager(tmp_path, keep_last=1).prune()  # another process deletes step 1
        assert ckpt.steps() == [2] and ckpt.best() == [2] and ckpt.latest() == 2


def test_a_retention_failure_does_not_fail_the_committed_save(tmp_path, monkeypatch, caplog):
    from checkpoint.errors import StorageError
    from checkpoint.io import storage

    def refuse(loc, step):  # a fault: as root, permissions cannot make a real delete fail
        raise StorageError(f"could not delete step {step}: Permission denied")

    monkeypatch.setattr(storage, "delete_step", refuse)
    with CheckpointManager(tmp_path, keep_last=1) as ckpt:
        ckpt.save(1, {"w": torch.ones(3)})
        ckpt.save(2, {"w": torch.ones(3)})
        ckpt.wait()  # step 2 is committed: its save succeeded, whatever retention did
        assert ckpt.steps() == [1, 2]
    assert "step 2 is committed, but retention failed" in caplog.text
