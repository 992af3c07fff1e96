"""The declared torch minimum is true: it is the newest first release among the torch
modules the package imports (a module imported under `try` with an ImportError fallback
counts by its fallback). A new torch import must be dated here, which keeps the claim true.
"""

from __future__ import annotations

import ast
import pathlib
import re

import torch
from helpers import REPO
from packaging.version import Version

# Where each name the code imports first became importable from that module.
FIRST_RELEASE = {
    "torch": "2.0",
    "torch.distributed": "2.0",
    "torch.utils.data": "2.0",
    "torch.distributed.utils": "2.0",  # _sync_module_states, _verify_param_shape_across_processes
    "torch.distributed.checkpoint.state_dict": "2.2",  # get_/set_model_state_dict, ..._optimizer_...
    "torch.distributed._composable.fsdp": "2.4",  # FSDPModule before its public home
    "torch.distributed.fsdp": "2.6",  # FSDPModule's public home (imported with the fallback above)
    "torch.distributed.tensor": "2.5",  # DTensor, Shard, Replicate: torch.distributed._tensor before
    "torch.distributed.tensor._utils": "2.5",  # compute_local_shape_and_global_offset
}


def required_torch_modules() -> dict[str, str]:
    """torch module -> a file importing it, leaving out imports that have an ImportError fallback."""
    found: dict[str, str] = {}
    for package in ("checkpoint", "elastic"):
        for path in sorted((pathlib.Path(REPO) / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            optional = {
                id(node)
                for t in ast.walk(tree) if isinstance(t, ast.Try)
                and any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in t.handlers)
                for stmt in t.body for node in ast.walk(stmt)
            }
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    if name.split(".")[0] == "torch":
                        found.setdefault(name, str(path.relative_to(REPO)))
    return found


def declared_minimum() -> Version:
    text = (pathlib.Path(REPO) / "pyproject.toml").read_text()
    (minimum,) = re.findall(r'^\s*"torch>=([0-9.]+)",', text, flags=re.MULTILINE)
    return Version(minimum)


def test_every_torch_import_is_dated():
    undated = {m: f for m, f in required_torch_modules().items() if m not in FIRST_RELEASE}
    assert not undated, f"date these torch imports in FIRST_RELEASE (first release that has them): {undated}"


def test_declared_minimum_is_the_newest_import():
    required = required_torch_modules()
    newest = max(required, key=lambda m: Version(FIRST_RELEASE.get(m, "0")))
    assert declared_minimum() == Version(FIRST_RELEASE[newest]), (
        f"pyproject.toml says torch>={declared_minimum()}, but {required[newest]} imports {newest}, "
        f"first in torch {FIRST_RELEASE[newest]}"
    )
    assert Version(torch.__version__.split("+")[0]) >= declared_minimum()
