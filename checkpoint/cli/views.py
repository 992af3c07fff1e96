"""What `elastic-ckpt inspect` shows: 80-column tables and the JSON documents (docs/CLI.md).

Pure functions of what catalog.scan found plus the time "now"; nothing here touches storage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from checkpoint.format import statedict
from checkpoint.cli.catalog import StepEntry
from checkpoint.format.manifest import Manifest, torch_dtype
from checkpoint.cli.tables import WIDTH, Column, age, fit, number, render, size

# Bump on any change that could break a script reading `inspect --json`.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Marks:
    """Which steps the retention policy calls latest and best, and by what rule."""

    latest: int | None
    best: tuple[int, ...]
    metric: str | None
    mode: str
    keep_best: int


def _strict(value: Any) -> Any:
    """Strict JSON has no NaN/Infinity: those floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return dict(sorted(metrics.items()))


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(_strict(doc), indent=2, sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------- the list of checkpoints


def _age_of(entry: StepEntry, now: float) -> float | None:
    when = entry.manifest.created if entry.manifest is not None else entry.modified
    return None if not when else now - when


def list_json(url: str, entries: Sequence[StepEntry], marks: Marks, now: float) -> dict[str, Any]:
    rows = []
    for e in entries:
        m = e.manifest
        rows.append({
            "step": e.step,
            "status": e.status,
            "epoch": m.epoch if m else None,
            "metrics": _metrics(m.metrics) if m else {},
            "world_size": m.world_size if m else None,
            "run_id": m.run_id if m else None,
            "round": m.round if m else None,
            "created": m.created if m else None,
            "tier": m.tier if m else None,
            "age_seconds": _age_of(e, now),
            "bytes": e.nbytes,
            "files": e.nfiles,
            "latest": e.step == marks.latest,
            "best": e.step in marks.best,
            "error": e.error,
        })
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "checkpoints",
        "url": url,
        "now": now,
        "latest": marks.latest,
        "best": None if marks.metric is None else {
            "metric": marks.metric, "mode": marks.mode, "keep": marks.keep_best, "steps": list(marks.best),
        },
        "checkpoints": rows,
    }


def _columns(run_header: str, tier: bool) -> tuple[Column, ...]:
    return (
        Column(""),
        Column("STEP", right=True),
        Column("EPOCH", right=True),
        Column("WORLD", right=True),
        Column(run_header, shrink=True, middle=True),
        Column("SIZE", right=True),
        Column("FILES", right=True),
        Column("AGE", right=True),
        Column("STATUS"),
        *([Column("TIER")] if tier else []),
        Column("METRICS", shrink=True),
    )


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _run(m: Manifest, shared_run: bool) -> str:
    """The round alone when every checkpoint has the same run id (shown once, above)."""
    if shared_run:
        return _opt(m.round)
    if m.run_id is None and m.round is None:
        return "-"
    return f"{_opt(m.run_id)}/{_opt(m.round)}"


def _mark(step: int, marks: Marks) -> str:
    return ("L" if step == marks.latest else "") + ("B" if step in marks.best else "")


def _metrics_text(metrics: Mapping[str, float], first: str | None = None) -> str:
    """`name=value` pairs by name, the metric that ranks "best" first."""
    names = sorted(metrics, key=lambda k: (k != first, k))
    return " ".join(f"{k}={number(metrics[k])}" for k in names) or "-"


def _row(e: StepEntry, marks: Marks, now: float, shared_run: bool, tier: bool) -> list[str]:
    m = e.manifest
    common = [size(e.nbytes), str(e.nfiles), age(_age_of(e, now)), e.status] + ([m.tier if m else "-"] if tier else [])
    if m is None:
        return [_mark(e.step, marks), str(e.step), "-", "-", "-", *common, "-"]
    metrics = _metrics_text(m.metrics, marks.metric)
    return [_mark(e.step, marks), str(e.step), _opt(m.epoch), str(m.world_size), _run(m, shared_run), *common, metrics]


def list_text(url: str, entries: Sequence[StepEntry], marks: Marks, now: float) -> list[str]:
    counts = {s: sum(e.status == s for e in entries) for s in ("committed", "incomplete", "corrupt")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    runs = {e.manifest.run_id for e in entries if e.manifest is not None}
    shared_run = len(runs) == 1
    if shared_run:
        summary += f", run {_opt(next(iter(runs)))}"
    lines = [fit(f"{summary} in {url}", WIDTH, middle=True)]
    # The tier a save was committed to, shown once a memory save is there (memory-tier
    # directories, or durable ones holding checkpoints saved at breakpoint).
    tier = any(e.manifest is not None and e.manifest.tier != "durable" for e in entries)
    rows = [_row(e, marks, now, shared_run, tier) for e in entries]
    lines += render(_columns("ROUND" if shared_run else "RUN/ROUND", tier), rows)
    legend = "L = latest committed (resume point)"
    if marks.metric is not None:
        legend += f", B = best {marks.keep_best} by {marks.metric} ({marks.mode})"
    lines.append(fit(legend, WIDTH))
    lines += [fit(f"step {e.step}: {e.error}", WIDTH) for e in entries if e.error]
    return lines


# ---------------------------------------------------------------- one checkpoint


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch_dtype(dtype).itemsize


def state_leaves(skeleton: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, value) for every non-tensor value of the state skeleton, in order."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {statedict.TENSOR_TAG}:
            return []
        if set(skeleton) == {statedict.ITEMS_TAG}:
            pairs = [(str(k), v) for k, v in skeleton[statedict.ITEMS_TAG]]
        elif set(skeleton) == {statedict.TUPLE_TAG}:
            pairs = [(str(i), v) for i, v in enumerate(skeleton[statedict.TUPLE_TAG])]
        else:
            pairs = list(skeleton.items())
    elif isinstance(skeleton, list):
        pairs = [(str(i), v) for i, v in enumerate(skeleton)]
    else:
        return [(path, skeleton)]
    if not pairs:
        return [(path, skeleton)]
    return [leaf for k, v in pairs for leaf in state_leaves(v, f"{path}/{k}" if path else k)]


def step_json(url: str, entry: StepEntry, manifest: Manifest, now: float) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "checkpoint",
        "url": url,
        "now": now,
        "step": manifest.step,
        "status": entry.status,
        "epoch": manifest.epoch,
        "metrics": _metrics(manifest.metrics),
        "world_size": manifest.world_size,
        "run_id": manifest.run_id,
        "round": manifest.round,
        "created": manifest.created,
        "tier": manifest.tier,
        "age_seconds": _age_of(entry, now),
        "bytes": sum(f.size for f in manifest.files),
        "files": [{"index": i, "name": f.path, "bytes": f.size} for i, f in enumerate(manifest.files)],
        "tensors": [
            {
                "name": key,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "bytes": _nbytes(t.dtype, t.shape),
                "files": sorted({c.file for c in t.chunks}),
                "chunks": len(t.chunks),
            }
            for key, t in sorted(manifest.tensors.items())
        ],
        "state": manifest.state,
    }


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def step_text(url: str, entry: StepEntry, manifest: Manifest, now: float) -> list[str]:
    m = manifest
    index = {f.path: i for i, f in enumerate(m.files)}
    head = (
        f"step {m.step} ({entry.status}), epoch {_opt(m.epoch)}, world size {m.world_size}, "
        f"run {_opt(m.run_id)}, round {_opt(m.round)}, {age(_age_of(entry, now))} old, saved to {m.tier}"
    )
    metrics = _metrics_text(m.metrics)
    lines = [fit(f"{url}", WIDTH), fit(head, WIDTH), fit(f"metrics: {metrics}", WIDTH), ""]
    lines += render(
        (Column("FILE", right=True), Column("SIZE", right=True), Column("NAME", shrink=True, middle=True)),
        [[str(i), size(f.size), f.path] for i, f in enumerate(m.files)],
    )
    lines.append("")
    tensor_rows = [
        [key, t.dtype, _shape(t.shape), size(_nbytes(t.dtype, t.shape)),
         ",".join(str(i) for i in sorted({index[c.file] for c in t.chunks}))]
        for key, t in sorted(m.tensors.items())
    ]
    lines += render(
        (Column("TENSOR", shrink=True, middle=True), Column("DTYPE"), Column("SHAPE", shrink=True),
         Column("BYTES", right=True), Column("FILE", shrink=True)),
        tensor_rows,
    )
    lines += ["", "non-tensor state:"]
    leaves = state_leaves(m.state)
    lines += [fit(f"  {p} = {json.dumps(v)}", WIDTH) for p, v in leaves] or ["  (none)"]
    return lines
