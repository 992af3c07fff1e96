"""The timeline of a finished job, per node, as text (`elastic-run report --timeline`): one
row of time slots per node, from its events log.

Each slot shows the most telling thing that happened in it on that node: X a failure, S a
straggler flagged, C a checkpoint committed, = steps completed, - a round ran without a
step (start-up, recovery), blank nothing (not in a round). A row below each node gives the
world size of the round it ran in (digits; + for 10 or more).
"""

from __future__ import annotations

_MARKS = ["X", "S", "C", "=", "-"]  # in order of precedence within one slot
LEGEND = "X failure  S straggler flagged  C checkpoint  = steps  - in a round, no step"


def render(by_node: dict[str, list[dict]], width: int = 72) -> str:
    """The timeline of every node's events, `width` slots wide, all on one time axis."""
    times = [e["time"] for events in by_node.values() for e in events]
    if not times:
        return "(no events)"
    start, end = min(times), max(times)
    span = max(end - start, 1e-9)

    def slot(t: float) -> int:
        return min(width - 1, int((t - start) / span * width))

    rows = _with_straggler_marks(by_node)
    label = max(len(n) for n in rows) + 6
    lines = [f"{'':{label}} {0:<{width // 2}.1f}{span:>{width - width // 2}.1f}s"]
    for node, events in sorted(rows.items()):
        marks, world = _node_rows(sorted(events, key=lambda e: e["time"]), slot, width)
        lines.append(f"{node:<{label}}|{''.join(marks)}|")
        lines.append(f"{'  world':<{label}}|{''.join(world)}|")
    lines.append(LEGEND)
    return "\n".join(lines)


def _with_straggler_marks(by_node: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each node's events, with the straggler events (logged by the judging node, naming the
    straggler) moved to the straggler's row."""
    rows = {node: [e for e in events if e["event"] != "straggler"] for node, events in by_node.items()}
    for events in by_node.values():
        for e in events:
            if e["event"] == "straggler":
                rows.setdefault(e["straggler"], []).append(e)
    return rows


def _node_rows(events: list[dict], slot, width: int) -> tuple[list[str], list[str]]:
    marks, world = [" "] * width, [" "] * width
    in_round_from: int | None = None
    stepping_from: int | None = None
    size = " "
    for event in events:
        kind, at = event["event"], slot(event["time"])
        if kind == "round_sealed":
            _fill(world, size, in_round_from, at)
            in_round_from = at
            size = str(event["world_size"]) if event["world_size"] < 10 else "+"
        elif kind in ("failure", "round_left", "lease_lost", "job_end", "left", "interrupted"):
            _fill(world, size, in_round_from, at + 1)
            _fill(marks, "-", in_round_from, at + 1, only_blank=True)
            in_round_from = None
        if kind == "progress":  # steps completed all along since the round's previous progress event
            _fill(marks, "=", stepping_from if stepping_from is not None else at, at + 1, only_blank=True)
            stepping_from = at
        if kind in ("round_sealed", "failure", "round_left", "lease_lost", "job_end", "left", "interrupted"):
            stepping_from = None
        mark = {"failure": "X", "straggler": "S", "checkpoint_committed": "C", "progress": "="}.get(kind)
        if mark is not None and (marks[at] == " " or _MARKS.index(mark) < _MARKS.index(marks[at])):
            marks[at] = mark
    _fill(world, size, in_round_from, width)
    _fill(marks, "-", in_round_from, width, only_blank=True)
    return marks, world


def _fill(row: list[str], char: str, start: int | None, stop: int, only_blank: bool = False) -> None:
    if start is None:
        return
    for i in range(start, min(stop, len(row))):
        if not only_blank or row[i] == " ":
            row[i] = char
