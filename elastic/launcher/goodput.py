"""Goodput from an events log: where the wall time of a job went. Also `elastic-run report`.

The agent's summary at exit and `elastic-run report EVENTS...` use the same `summarize()`:
useful time is the time during which steps completed (from the first step of a round to
its last); the rest is lost, attributed to the cause that ended the previous stretch of
training: start-up, failure recovery, or a planned change (growth, a node leaving), plus the
tail of each round after its last completed step (work that was thrown away).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, field

from elastic.launcher import timeline

PROG = "elastic-run report"


@dataclass
class Goodput:
    wall: float = 0.0
    useful: float = 0.0
    lost: dict[str, float] = field(default_factory=dict)  # cause -> seconds
    steps: int = 0
    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    commits: int = 0  # checkpoint commits
    stall: float = 0.0  # seconds their saves held training (already inside the step time)
    checkpoint_step: int | None = None  # the newest checkpoint committed
    stragglers: list[str] = field(default_factory=list)  # nodes flagged as stragglers (elastic/launcher/stragglers.py)

    @property
    def ratio(self) -> float:
        return self.useful / self.wall if self.wall > 0 else 0.0

    def table(self) -> str:
        lines = [f"  goodput: {100 * self.ratio:5.1f}%  ({self.useful:.1f}s of {self.wall:.1f}s in steps; "
                 f"{self.steps} steps, {self.rounds} rounds)"]
        for cause, seconds in sorted(self.lost.items(), key=lambda kv: -kv[1]):
            lines.append(f"  lost to {cause:<18} {seconds:8.1f}s")
        if self.commits:
            lines.append(f"  checkpoints: {self.commits} committed (newest: step {self.checkpoint_step}), "
                         f"training held {self.stall:.2f}s by their saves")
        if self.stragglers:
            lines.append(f"  stragglers flagged: {', '.join(self.stragglers)}")
        return "\n".join(lines)


def summarize(events: list[dict]) -> Goodput:
    """Account a node's events (one agent's log) into useful and lost time."""
    account = GoodputAccount()
    for event in sorted(events, key=lambda e: e["time"]):
        account.add(event)
    return account.result()


class GoodputAccount:
    """The goodput of one node's events so far, fed one event at a time in time order: the
    agent keeps this running summary, not the events, so its memory does not grow however
    long the job runs (progress events come up to twice a second)."""

    # Events that end a stretch of training; the cause they give the time lost after them.
    _ENDS = {"failure": "failure recovery", "round_left": "planned changes", "lease_lost": "failure recovery",
             "succeeded": None, "interrupted": None, "left": None, "job_end": None}

    def __init__(self) -> None:
        self._goodput = Goodput()
        self._start: float | None = None  # time of the first event
        self._end = 0.0  # time of the latest event
        self._cause = "start-up"  # what the time until the next step is lost to
        self._stretch_end = 0.0  # when training last stopped being useful
        self._first: float | None = None  # first step completion in the current stretch
        self._last = 0.0  # last step completion in the current stretch

    def add(self, event: dict) -> None:
        at, kind, g = event["time"], event["event"], self._goodput
        if self._start is None:
            self._start = self._stretch_end = at
        self._end = max(self._end, at)
        if kind == "progress":
            g.steps = max(g.steps, event["step"])
            if self._first is None:
                _add(g.lost, self._cause, at - self._stretch_end)
                self._first = at
            self._last = at
        elif kind in self._ENDS:
            if kind == "failure":  # one per restart: bounded by --max-restarts
                g.failures.append(event.get("reason", "?"))
            if self._first is not None:
                g.useful += self._last - self._first
                _add(g.lost, "discarded tail", at - self._last)
                self._stretch_end = at
                self._first = None
            self._cause = self._ENDS[kind] or self._cause
        elif kind == "round_sealed":
            g.rounds += 1
        elif kind == "checkpoint_committed":
            g.commits += 1
            g.stall += event["stall"]
            g.checkpoint_step = max(event["step"], g.checkpoint_step or 0)
        elif kind == "straggler" and event["straggler"] not in g.stragglers:  # bounded by the node count
            g.stragglers.append(event["straggler"])

    def result(self) -> Goodput:
        """The account as of the last event (a copy: adding more does not change it)."""
        g = self._goodput
        return dataclasses.replace(g, wall=self._end - self._start if self._start is not None else 0.0,
                                   lost=dict(g.lost), failures=list(g.failures), stragglers=list(g.stragglers))


def _add(lost: dict[str, float], cause: str, seconds: float) -> None:
    if seconds > 0:
        lost[cause] = lost.get(cause, 0.0) + seconds


def load_events(paths: list[str]) -> dict[str, list[dict]]:
    """node -> its events, from one or more events.jsonl files."""
    by_node: dict[str, list[dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{number}: not a JSON line (is this an events.jsonl?)") from None
                by_node.setdefault(event.get("node", "?"), []).append(event)
    return by_node


def plot_timeline(by_node: dict[str, list[dict]], png: str) -> None:
    """World size and completed steps over time, failures marked, one picture."""
    import matplotlib  # noqa: PLC0415  (optional: only `report --png` needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    start = min(e["time"] for events in by_node.values() for e in events)
    fig, (ax_world, ax_steps) = plt.subplots(2, 1, sharex=True, figsize=(9, 5))
    for node, events in sorted(by_node.items()):
        sealed = [(e["time"] - start, e["world_size"]) for e in events if e["event"] == "round_sealed"]
        if sealed:
            end = max(e["time"] for e in events) - start
            xs = [t for t, _ in sealed] + [end]
            ys = [w for _, w in sealed] + [sealed[-1][1]]
            ax_world.step(xs, ys, where="post", label=node)
        progress = [(e["time"] - start, e["step"]) for e in events if e["event"] == "progress"]
        if progress:
            ax_steps.plot(*zip(*progress), ".-", markersize=3, label=node)
        commits = [(e["time"] - start, e["step"]) for e in events if e["event"] == "checkpoint_committed"]
        if commits:
            ax_steps.plot(*zip(*commits), "s", color="green", markersize=4)
        for e in events:
            color = {"failure": "red", "straggler": "orange"}.get(e["event"])
            if color is not None:
                for ax in (ax_world, ax_steps):
                    ax.axvline(e["time"] - start, color=color, alpha=0.6, linewidth=1)
    ax_world.set_ylabel("world size")
    ax_steps.set_ylabel("completed step")
    ax_steps.set_xlabel("seconds since start (red: failures, orange: stragglers flagged, squares: checkpoints)")
    ax_world.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Summarise elastic-run events logs.")
    parser.add_argument("events", nargs="+", help="events.jsonl files (one per node)")
    parser.add_argument("--png", help="also draw a timeline picture into this PNG file")
    parser.add_argument("--timeline", action="store_true", help="also draw each node's timeline as text")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    ns = parser.parse_args(argv)
    try:
        by_node = load_events(ns.events)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    summaries = {node: summarize(events) for node, events in by_node.items()}
    if ns.json:
        print(json.dumps({node: {**asdict(s), "goodput": s.ratio} for node, s in summaries.items()}, indent=2))
    else:
        for node, summary in sorted(summaries.items()):
            print(f"node {node}:\n{summary.table()}")
            for reason in summary.failures:
                print(f"  failure: {reason}")
    if ns.timeline:
        print(timeline.render(by_node))
    if ns.png:
        try:
            plot_timeline(by_node, ns.png)
        except ImportError:
            print(f"{PROG}: error: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        print(f"timeline written to {ns.png}", file=sys.stderr)
    return 0
