"""The public surface of `elastic` and `checkpoint` (names users and scripts rely on), and
that the launcher does not pay for importing torch."""

from __future__ import annotations

import subprocess
import sys

import checkpoint
import elastic
from helpers import child_env


def test_elastic_public_names():
    assert elastic.__all__ == sorted([
        "ConfigError", "Context", "ElasticError", "ElasticSampler", "RendezvousConnectionError",
        "RendezvousError", "RendezvousTimeoutError", "StaleRoundError", "StateMismatchError",
        "Step", "TrainLoop", "TrainLoopUsageError", "init", "sample_generator"])
    for name in elastic.__all__:
        assert getattr(elastic, name) is not None
    assert callable(elastic.init) and isinstance(elastic.TrainLoop, type)
    assert issubclass(elastic.StaleRoundError, elastic.RendezvousError)


def test_checkpoint_public_names():
    assert checkpoint.__all__ == sorted([
        "CheckpointCorruptError", "CheckpointError", "CheckpointManager", "CheckpointMismatchError",
        "CheckpointNotFoundError", "PerRank", "StorageError"])
    for name in checkpoint.__all__:
        assert getattr(checkpoint, name) is not None
    for method in ("save", "wait", "load", "latest", "best", "steps", "close"):
        assert callable(getattr(checkpoint.CheckpointManager, method)), method


def test_entry_points():
    """The installed console scripts and the `python -m` entries run."""
    from importlib.metadata import distribution

    scripts = {e.name: e.value for e in distribution("elastic-train").entry_points if e.group == "console_scripts"}
    assert set(scripts) == {"elastic-run", "elastic-ckpt"}
    for command in (["-m", "elastic", "--help"], ["-m", "checkpoint", "--help"],
                    *(["-c", f"import sys; from {target.split(':')[0]} import {target.split(':')[1]} as m; "
                             "sys.argv[1:] = ['--help']; m()"] for target in scripts.values())):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=child_env())
        assert done.returncode == 0, (command, done.stderr)
        assert "usage:" in done.stdout


def test_launcher_does_not_import_torch():
    code = "import sys, elastic.launcher.cli, elastic.launcher.agent; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
