"""Shared machinery of the chaos suite: run tests/loop_worker.py under real `elastic-run`,
wait for what it reports (per-step records, events.jsonl lines, checkpoint directories), and
judge a finished run against the uninterrupted reference.

The job: tests/loop_worker.py (float64, SGD with momentum, StepLR), global batch 7, micro
batch 1, STEPS optimizer steps, a checkpoint every SAVE_EVERY steps, paced by STEP_DELAY s
per step so that faults land in the middle of training. Every rank appends one JSON line per
step to <out>/ids.<tag>[.restartN].rank<R>.jsonl with the sample ids it consumed, the wall
time, its pid and its rendezvous round; rank 0 of the attempt that finishes writes
<out>/params.<tag>[.restartN].pt.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helpers import REPO, Job, child_env, wait_until  # noqa: F401  (re-exported for the scenarios)

LOOP_WORKER = os.path.join(REPO, "tests", "loop_worker.py")
STEPS = 24
SAVE_EVERY = 3
GLOBAL_BATCH = 7
STEP_DELAY = 0.08
RESIZE_ATOL = 1e-7


def job_args(out: Path, tag: str, *extra: str, steps: int = STEPS, delay: float = STEP_DELAY) -> list[str]:
    return [LOOP_WORKER, "--out", str(out), "--tag", tag, "--global-batch", str(GLOBAL_BATCH),
            "--micro-batch", "1", "--max-steps", str(steps), "--save-every", str(SAVE_EVERY),
            "--step-delay", str(delay), *extra]



# ---------------------------------------------------------------- what a run leaves behind

_IDS = re.compile(r"ids\.(?P<tag>.+?)(?:\.restart(?P<restart>\d+))?\.rank(?P<rank>\d+)\.jsonl$")


def read_records(out: Path, tag: str) -> list[dict]:
    """Every per-step record of every attempt of `tag`, each with "rank" and "restart" added."""
    records = []
    for path in glob.glob(str(out / f"ids.{tag}*.rank*.jsonl")):
        m = _IDS.search(os.path.basename(path))
        if not m or m["tag"] != tag:
            continue
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):  # a rank killed mid-write leaves at most a partial line
                    rec = json.loads(line)
                    rec.update(rank=int(m["rank"]), restart=int(m["restart"] or 0), tag=tag)
                    records.append(rec)
    return records


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def final_params(out: Path, tag: str) -> dict[str, torch.Tensor]:
    found = [p for p in glob.glob(str(out / f"params.{tag}*.pt"))
             if re.fullmatch(rf"params\.{re.escape(tag)}(\.restart\d+)?\.pt", os.path.basename(p))]
    assert len(found) == 1, f"expected the params of exactly one finished attempt, found {found}"
    return torch.load(found[0])


@dataclass
class Reference:
    """The uninterrupted run: final parameters and the sorted sample ids of every step."""

    world: int
    params: dict[str, torch.Tensor]
    ids: dict[int, list[int]]


def step_samples(records: list[dict]) -> dict[tuple[str, int, int], dict[int, dict]]:
    """(tag, round, step) -> rank -> record."""
    table: dict[tuple[str, int, int], dict[int, dict]] = defaultdict(dict)
    for rec in records:
        key = (rec["tag"], int(rec["round"]) if rec.get("round") is not None else rec["restart"], rec["step"])
        assert rec["rank"] not in table[key], f"rank {rec['rank']} ran step {key} twice in one round"
        table[key][rec["rank"]] = rec
    return table


def check_samples(records: list[dict], ref: Reference, steps: int = STEPS) -> None:
    """Every step that a round completed on all its ranks consumed exactly the reference's
    samples, each once; a step cut short by a fault consumed only samples of that step; and
    every step 0..steps-1 was completed by some round."""
    completed = set()
    for (_tag, round_, step), by_rank in step_samples(records).items():
        world = next(iter(by_rank.values()))["world"]
        want = ref.ids[step]
        got = sorted(i for rec in by_rank.values() for i in rec["ids"])
        if len(by_rank) == world:
            assert got == want, f"round {round_} step {step}: samples {got}, reference {want}"
            completed.add(step)
        else:  # a fault stopped the other ranks during this step
            assert len(set(got)) == len(got) and set(got) <= set(want), (round_, step, got, want)
    missing = sorted(set(range(steps)) - completed)
    assert not missing, f"steps never completed by any round: {missing}"


def check_params(params: dict[str, torch.Tensor], ref: Reference, *, exact: bool) -> None:
    assert params.keys() == ref.params.keys()
    for name, want in ref.params.items():
        got = params[name]
        assert got.dtype == torch.float64
        if exact:
            assert torch.equal(got, want), f"{name} differs from the reference (max |d| = " \
                f"{(got - want).abs().max().item():.3g}); expected bitwise equality"
        else:
            diff = (got - want).abs().max().item()
            assert diff <= RESIZE_ATOL, f"{name}: max |d| = {diff:.3g} > {RESIZE_ATOL}"


def check_checkpoints(ckpt_dir: Path, expect_latest: int | None = STEPS) -> list[int]:
    """Every committed checkpoint reads back with every checksum right."""
    from checkpoint import CheckpointManager

    manager = CheckpointManager(str(ckpt_dir), async_write=False)
    steps = manager.steps()
    assert steps, f"no committed checkpoint in {ckpt_dir}"
    for step in steps:
        assert manager.verify(step) == step
    if expect_latest is not None:
        assert steps[-1] == expect_latest, steps
    manager.close()
    return steps


def check_run(out: Path, tag: str, ckpt_dir: Path | None, ref: Reference, *, exact: bool = True,
              tags: tuple[str, ...] | None = None) -> None:
    """The three promises: parameters, samples, checkpoints. `tags`: every tag whose records
    make up the job (a job resumed by a second elastic-run writes under a second tag)."""
    check_params(final_params(out, tag), ref, exact=exact)
    records = [r for t in (tags or (tag,)) for r in read_records(out, t)]
    check_samples(records, ref)
    if ckpt_dir is not None:
        check_checkpoints(ckpt_dir)


# ---------------------------------------------------------------- one standalone elastic-run

@dataclass
class Run:
    """`elastic-run --standalone` of the loop job with its own log dir; output in a file."""

    tmp: Path
    tag: str = "run"
    nproc: int = 2
    flags: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    ckpt_dir: Path | None = None
    name: str = "run"
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ckpt_dir = self.ckpt_dir or self.tmp / "ckpt"
        self.log_dir = self.tmp / f"logs-{self.name}"
        self.console = self.tmp / f"{self.name}.console.log"

    def start(self) -> Run:
        cmd = [sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", str(self.nproc),
               "--monitor-interval", "0.05", "--log-dir", str(self.log_dir),
               "--checkpoint-dir", str(self.ckpt_dir), *self.flags,
               *job_args(self.tmp, self.tag, *self.worker_args)]
        self.started = time.time()
        with open(self.console, "w") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        return self

    def dead(self) -> str | None:
        if self.proc.poll() is not None:
            return f"elastic-run exited {self.proc.returncode}:\n{self.output()[-4000:]}"
        return None

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def events(self) -> list[dict]:
        return read_events(self.log_dir / "events.jsonl")

    def records(self) -> list[dict]:
        return read_records(self.tmp, self.tag)

    def wait_event(self, event: str, timeout: float = 240, **match: Any) -> dict:
        def find():
            return next((e for e in self.events() if e["event"] == event
                         and all(e.get(k) == v for k, v in match.items())), None)
        return wait_until(f"event {event} {match}", find, timeout, alive=self.dead)

    def wait_step(self, step: int, *, restart: int = 0, rank: int | None = None, timeout: float = 240) -> dict:
        """The record of the first step >= `step` that `rank` (any rank) ran in attempt `restart`."""
        def find():
            hits = [r for r in self.records() if r["restart"] == restart and r["step"] >= step
                    and (rank is None or r["rank"] == rank)]
            return min(hits, key=lambda r: r["step"]) if hits else None
        return wait_until(f"step {step} of attempt {restart} (rank {rank})", find, timeout, alive=self.dead)

    def kill_rank(self, record: dict, sig: signal.Signals = signal.SIGKILL) -> float:
        """Signal the process that wrote `record`; return the wall time of the fault."""
        at = time.time()
        os.kill(record["pid"], sig)
        return at

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"elastic-run did not finish in {timeout}s:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- several agents (helpers.Job)

def wait_records(job: Job, what: str, pred, timeout: float = 240, *, needed: str | None = None) -> dict:
    """The first per-step record of the job that satisfies `pred`; fails at once if an agent
    exits (of the nodes `needed`, default all)."""
    def alive():
        dead = {n: p.returncode for n, p in job.agents.items()
                if (needed is None or n in needed) and p.poll() is not None}
        return f"agents exited {dead}:\n" + "\n".join(job.log(n)[-3000:] for n in dead) if dead else None

    return wait_until(what, lambda: next((r for r in read_records(job.outdir, "run") if pred(r)), None),
                      timeout, alive=alive)


def all_events(job: Job) -> list[dict]:
    return sorted((e for n in job.agents for e in job.events(n)), key=lambda e: e["time"])


# ---------------------------------------------------------------- recovery time

def recovery(events: list[dict], records: list[dict], fault_at: float, restart: int) -> dict[str, float]:
    """Seconds from the fault to: its detection (failure event), the next round sealed, the
    new workers started, and the first step completed by every rank of attempt `restart`."""
    after = [e for e in events if e["time"] >= fault_at - 0.0005]  # times are rounded to ms

    def first(kind: str) -> float | None:
        return next((e["time"] - fault_at for e in after if e["event"] == kind), None)

    by_rank: dict[int, float] = {}
    for rec in records:
        if rec["restart"] == restart:
            by_rank[rec["rank"]] = min(by_rank.get(rec["rank"], rec["t"]), rec["t"])
    out = {"detect": first("failure"), "sealed": first("round_sealed"), "spawned": first("workers_started"),
           "first_step": (max(by_rank.values()) - fault_at) if by_rank else None}
    return {k: round(v, 2) for k, v in out.items() if v is not None}


def report(name: str, **facts: Any) -> None:
    """One line per scenario, shown with -s and collected for the closing note."""
    line = f"[chaos] {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items())
    print(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
