"""A manifest is trusted only once it is whole: chunks tile every tensor exactly once, every
field has its type, and anything else is a CheckpointCorruptError naming the file.

Hostile manifests come from hypothesis: mutations of a real manifest (a value replaced by
random JSON, a key dropped, an element duplicated or dropped, an integer nudged) and random
JSON. Whatever is accepted is checked against a dense count of every element.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
import uuid

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    PerRank,
)
from checkpoint.format.manifest import Manifest, checksum

WHERE = "hostile/manifest.json"


@functools.cache
def real_manifest() -> dict:
    """A manifest written by a real save (every skeleton tag present), with tensor "w" split
    into two row chunks as a two-rank save writes it."""
    state = {
        "w": torch.arange(12, dtype=torch.float32).reshape(4, 3), "b": torch.ones(5, dtype=torch.int64),
        "opts": {"sizes": [1, (2, 3)], 7: "seven"}, "n": 3, "mine": PerRank(torch.zeros(2)),
    }
    with CheckpointManager(f"memory://manifest-{uuid.uuid4().hex}") as ckpt:
        ckpt.save(1, state, metrics={"loss": 0.5})
        ckpt.wait()
        raw = json.loads(ckpt._loc.fs.cat_file(ckpt._loc.path(1, "manifest.json")))
    (whole,) = raw["tensors"]["w"]["chunks"]
    top, bottom = dict(whole), dict(whole)
    middle = whole["begin"] + 2 * 3 * 4
    top.update(shape=[2, 3], end=middle)
    bottom.update(offsets=[2, 0], shape=[2, 3], begin=middle)
    raw["tensors"]["w"]["chunks"] = [top, bottom]
    Manifest.from_json(json.dumps(raw), where=WHERE)  # the starting point is valid
    return raw


def assert_tiled_exactly_once(manifest: Manifest) -> None:
    """The oracle: count every element of every (small) tensor."""
    for key, t in manifest.tensors.items():
        if math.prod(t.shape) > 1_000_000:
            continue
        count = np.zeros(t.shape, dtype=np.int64)
        for c in t.chunks:
            count[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.shape))] += 1
        assert (count == 1).all(), f"{key}: accepted chunks that do not tile it: {t.chunks}"


def check_hostile(text: str) -> None:
    try:
        manifest = Manifest.from_json(text, where=WHERE)
    except CheckpointCorruptError as exc:
        assert str(exc).startswith(f"{WHERE}: "), exc
    except CheckpointError:
        pass
    else:
        assert_tiled_exactly_once(manifest)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        yield from paths(v, (*prefix, k))


@st.composite
def mutated(draw) -> str:
    raw = copy.deepcopy(real_manifest())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(raw))))
        if not path:
            raw = draw(json_values)
            continue
        parent = functools.reduce(lambda node, k: node[k], path[:-1], raw)
        key, value = path[-1], parent[path[-1]]
        action = draw(st.sampled_from(["replace", "drop", "duplicate", "nudge"]))
        if action == "drop":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(value))
        elif action == "nudge" and type(value) is int:
            parent[key] = value + draw(st.integers(-3, 3))
        else:
            parent[key] = draw(json_values)
    return json.dumps(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_manifests_raise_only_checkpoint_errors(text):
    check_hostile(text)


@settings(max_examples=200, deadline=None)
@given(st.one_of(json_values.map(json.dumps), st.text(max_size=40), st.binary(max_size=40)))
def test_random_json_raises_only_checkpoint_errors(text):
    check_hostile(text)


def test_deeply_nested_json_is_a_corrupt_error_not_a_recursion_error():
    with pytest.raises(CheckpointCorruptError, match=rf"^{WHERE}: manifest is not valid JSON"):
        Manifest.from_json("[" * 100_000 + "]" * 100_000, where=WHERE)


@pytest.mark.parametrize("edit", [
    lambda raw: raw["tensors"]["w"]["chunks"][1].update(offsets=[0, 0]),  # same count, rows 2-3 never written
    lambda raw: raw["tensors"]["w"]["chunks"][1].update(offsets=[1, 0]),  # overlap and gap
    lambda raw: raw["tensors"]["w"]["chunks"].append(raw["tensors"]["w"]["chunks"][0]),  # a duplicate
    lambda raw: raw["tensors"]["w"]["chunks"][1].update(offsets=[3, 0]),  # outside the tensor
])
def test_chunks_must_tile_each_tensor_exactly_once(edit):
    raw = copy.deepcopy(real_manifest())
    edit(raw)
    with pytest.raises(CheckpointCorruptError, match=rf"^{WHERE}: the chunks of tensor 'w' do not tile it"):
        Manifest.from_json(json.dumps(raw), where=WHERE)


@pytest.mark.parametrize("text", [
    "[]", "3", '"manifest"',
    lambda raw: raw.update(state=[]), lambda raw: raw.update(state="x"), lambda raw: raw.update(files={}),
    lambda raw: raw.update(tensors=[]), lambda raw: raw["files"][0].update(size="12"),
    lambda raw: raw["tensors"]["w"].update(shape=[4, True]), lambda raw: raw.update(metrics={"loss": "low"}),
    lambda raw: raw["state"].update(n={"__tensor__": "nowhere"}),
    lambda raw: raw["state"].update(n={"__items__": [[[], 1]]}),
    lambda raw: raw["state"]["mine"].update({"__per_rank__": []}), lambda raw: raw.update(world_size=None),
])
def test_malformed_manifest_is_a_corrupt_error_naming_the_file(text):
    if callable(text):
        raw = copy.deepcopy(real_manifest())
        text(raw)
        text = json.dumps(raw)
    with pytest.raises(CheckpointCorruptError, match=rf"^{WHERE}: "):
        Manifest.from_json(text, where=WHERE)


def test_overlapping_chunks_are_refused_on_load_and_latest_falls_back(tmp_path):
    """Two chunks with the right element count that both cover rows 0-1: before, the load
    'succeeded' and rows 2-3 kept whatever the target held."""
    with CheckpointManager(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": torch.arange(12, dtype=torch.float32).reshape(4, 3) * step})
    step_dir = tmp_path / "step_000000000002"
    path = step_dir / "manifest.json"
    raw = json.loads(path.read_text())
    (whole,) = raw["tensors"]["w"]["chunks"]
    first_rows = (step_dir / whole["file"]).read_bytes()[whole["begin"]:whole["begin"] + 24]
    twice = dict(whole, shape=[2, 3], end=whole["begin"] + 24, checksum=checksum(first_rows))
    raw["tensors"]["w"]["chunks"] = [twice, twice]
    path.write_text(json.dumps(raw))
    ckpt = CheckpointManager(tmp_path)
    target = {"w": torch.full((4, 3), -1.0)}
    with pytest.raises(CheckpointCorruptError, match=rf"^{path}: the chunks of tensor 'w' .*chunks 0 and 1 overlap"):
        ckpt.load(target, step=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert ckpt.load(target) == 1
    assert torch.equal(target["w"], torch.arange(12, dtype=torch.float32).reshape(4, 3))


def test_validation_stays_fast_for_big_checkpoints():
    """400 tensors in 256 row chunks plus 100 in a 16 x 16 grid (128,000 chunks)."""
    files = [{"path": f"rank{r:05d}.safetensors", "size": 1 << 40, "header_size": 8, "header_checksum": "crc32:0"}
             for r in range(256)]
    tensors = {}
    for k in range(400):
        tensors[f"row{k}"] = {"dtype": "float32", "shape": [4096, 64], "chunks": [
            {"file": files[r]["path"], "name": f"row{k}", "offsets": [16 * r, 0], "shape": [16, 64],
             "begin": 0, "end": 16 * 64 * 4, "checksum": "crc32:0"} for r in range(256)]}
    for k in range(100):
        tensors[f"grid{k}"] = {"dtype": "float32", "shape": [256, 256], "chunks": [
            {"file": files[16 * i + j]["path"], "name": f"grid{k}", "offsets": [16 * i, 16 * j], "shape": [16, 16],
             "begin": 0, "end": 16 * 16 * 4, "checksum": "crc32:0"} for i in range(16) for j in range(16)]}
    text = json.dumps({"format_version": 1, "step": 1, "world_size": 256, "files": files, "tensors": tensors,
                       "state": {"m": {k: {"__tensor__": k} for k in tensors}}})
    started = time.perf_counter()
    manifest = Manifest.from_json(text, where=WHERE)
    elapsed = time.perf_counter() - started
    assert len(manifest.tensors) == 500
    print(f"validated {sum(len(t['chunks']) for t in tensors.values())} chunks in {elapsed:.2f}s")
    assert elapsed < 30, elapsed  # ~3 s on one idle core; the bound leaves room for a busy machine
