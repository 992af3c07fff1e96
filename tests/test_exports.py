"""The public surface of `elastic`, and that the launcher does not pay for importing torch."""

from __future__ import annotations

import subprocess
import sys

import elastic
from helpers import child_env


def test_public_names():
    assert elastic.__all__ == sorted([
        "ConfigError", "Context", "ElasticError", "ElasticSampler", "RendezvousConnectionError",
        "RendezvousError", "RendezvousTimeoutError", "StaleRoundError", "StateMismatchError",
        "Step", "TrainLoop", "TrainLoopUsageError", "init"])
    for name in elastic.__all__:
        assert getattr(elastic, name) is not None


def test_launcher_does_not_import_torch():
    code = "import sys, elastic.run, elastic.agent; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
