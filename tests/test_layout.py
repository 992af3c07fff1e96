"""The tree shows the architecture: one job per module, no class a newcomer must read whole
to change one behaviour. Limits from issue 14: a class over 200 lines or a module over 400 is
split by responsibility, not allowed to grow."""

from __future__ import annotations

import ast
import pathlib

from helpers import REPO

MAX_CLASS_LINES = 200
MAX_MODULE_LINES = 400
PACKAGES = ("elastic", "checkpoint")


def sources() -> list[pathlib.Path]:
    return sorted(p for package in PACKAGES for p in (pathlib.Path(REPO) / package).rglob("*.py"))


def test_no_module_over_the_limit():
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_over_the_limit():
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                long[f"{path.relative_to(REPO)}:{node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


def test_no_two_modules_share_a_name_with_different_jobs():
    """Two `progress.py` (hang record vs terminal bar) once meant different things. Each
    package's `errors.py` and `__main__.py` do the same job in both."""
    names: dict[str, list[str]] = {}
    for path in sources():
        if path.name not in ("__init__.py", "__main__.py", "errors.py"):
            names.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {name: where for name, where in names.items() if len(where) > 1} == {}
