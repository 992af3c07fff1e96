"""The examples make every collective on every rank: none sits under `if <...>rank<...>:`
(examples/char_gpt.py once called loop.resume(), a collective load, on rank 0 only)."""

from __future__ import annotations

import ast
import os

import pytest
from helpers import REPO

# CheckpointManager's and TrainLoop's collectives (see their docstrings).
COLLECTIVES = {"CheckpointManager", "TrainLoop", "resume", "save", "load", "regroup"}
EXAMPLES = sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith(".py"))


def collectives_under_rank_checks(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and "rank" in ast.unparse(node.test):
            for call in (n for stmt in node.body + node.orelse for n in ast.walk(stmt) if isinstance(n, ast.Call)):
                name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                if name in COLLECTIVES:
                    found.append(f"line {call.lineno}: {ast.unparse(call)} under `if {ast.unparse(node.test)}`")
    return found


def test_the_check_finds_a_collective_under_a_rank_check():
    assert collectives_under_rank_checks("if ctx.rank == 0:\n    print(loop.resume())\n")


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_make_collectives_on_every_rank(name):
    with open(os.path.join(REPO, "examples", name)) as f:
        assert collectives_under_rank_checks(f.read()) == []
