"""The sides of the process boundary are a rule: import-linter checks the contracts in
pyproject.toml ([tool.importlinter]) against the real import graph."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, child_env

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, *args], cwd=REPO, capture_output=True, text=True, env=child_env())


def test_every_contract_is_kept():
    done = lint()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    for contract in ("import neither torch nor the worker side", "rendezvous protocol is pure",
                     "checkpoint format does no I/O", "launcher and worker never import each other"):
        assert contract in done.stdout.replace("\n", " "), contract


def test_a_broken_contract_is_reported(tmp_path):
    """The checker sees our real imports: a contract the code breaks fails it."""
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["elastic"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "agent without rendezvous"\ntype = "forbidden"\n'
                      'source_modules = ["elastic.launcher.agent"]\nforbidden_modules = ["elastic.rendezvous"]\n')
    done = lint("--config", str(config))
    assert done.returncode == 1, done.stdout
    assert "elastic.launcher.agent -> elastic.rendezvous" in done.stdout
