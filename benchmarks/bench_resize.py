"""Time to resize a job: in-process reconfiguration against restarting the workers.

Run:  python benchmarks/bench_resize.py [--cycles 5] [--out DIR]

One etcd, node a (`elastic-run --nnodes 1:2`, one rank, tests/loop_worker.py --ddp: tiny
float64 DDP model, checkpoint every 5 steps) trains for the whole job. Each cycle a node b
arrives (growth, 1 -> 2) and, once the job has made 3 steps at world size 2, leaves on
SIGTERM (graceful scale-down, 2 -> 1). The cycles run first with in-process reconfiguration
(`--reconfigure` on a), then with the default, `--no-reconfigure` (its worker is stopped and
a spare from its warm pool resumes from the checkpoint); b's worker is new either way.

Measured per change, to the first optimizer step completed by every rank of the new round:
- growth: from a's `growing` event (a bumped the round for the waiting node), or from when
  b's worker started its script if that was later: b's warm spare may still be importing
  torch when b is admitted, which is the same in both modes and only adds noise. The
  newcomer runs its whole script before the first step either way, so growth cannot gain
  much;
- leave: from the SIGTERM sent to b's agent.
`--setup-seconds S` makes the script sleep S s after elastic.init(), standing for a real
script's set-up (data set, CUDA start-up): a restarted rank repeats it, a reconfigured one
does not. With the tiny model and S=0, a restart in a warm spare costs about as much as a
reconfiguration. Before each change a's spare pool is ready (restart mode) and the job has
made 3 steps. Prints p50/p95 per change and mode and the ratios reconfigure/restart. The
modes run one after the other, not interleaved: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from _common import exited, pct, read_jsonl, wait_until  # noqa: E402
from elastic.rendezvous.etcd_server import EtcdServer  # noqa: E402

WORKER = os.path.join(REPO, "tests", "loop_worker.py")
RECONFIGURE, RESTART = "reconfigure", "restart"
WAIT_TIMEOUT = 300.0  # seconds for any one thing the benchmark waits for


def wait(what: str, check, procs: list[subprocess.Popen]):
    """The first truthy value of `check`; fails when one of `procs` (agents) exits first."""
    return wait_until(what, check, WAIT_TIMEOUT, alive=exited(procs, "an agent"), poll=0.01)


class Job:
    """Node a for the whole job; nodes b0, b1, ... come and go."""

    def __init__(self, out: str, endpoint: str, mode: str, last_call: float, setup: float) -> None:
        self.out, self.endpoint, self.mode, self.last_call, self.setup = out, endpoint, mode, last_call, setup
        self.run_id = f"resize-{mode}-{os.getpid()}"
        self.env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        flags = ("--reconfigure",) if mode == RECONFIGURE else ("--no-reconfigure",)
        self.a = self.agent("a", *flags)

    def agent(self, node: str, *flags: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "elastic", "--nnodes", "1:2", "--nproc-per-node", "1",
               "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id, "--node-id", node,
               "--rdzv-conf", f"last_call_timeout={self.last_call},lease_ttl=5", "--grace", "10",
               "--monitor-interval", "0.05", "--log-dir", os.path.join(self.out, f"logs-{node}"),
               "--checkpoint-dir", os.path.join(self.out, "ckpt"), *flags,
               WORKER, "--out", self.out, "--tag", "run", "--ddp", "--global-batch", "8",
               "--max-steps", "1000000", "--save-every", "5", "--step-delay", "0.05",
               "--setup-seconds", str(self.setup)]
        log = open(os.path.join(self.out, f"agent-{node}.log"), "w")
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def events(self, node: str = "a") -> list[dict]:
        return read_jsonl(os.path.join(self.out, f"logs-{node}", "events.jsonl"))

    def script_started(self, node: str, round_: int) -> float:
        """When `node`'s worker of `round_` started running the script (its boot record)."""
        (pid,) = next(e["pids"] for e in self.events(node) if e["event"] == "workers_started" and e["round"] == round_)
        boots = [b for rank in range(2) for b in read_jsonl(os.path.join(self.out, f"boot.run.rank{rank}.jsonl"))]
        return next(b["started"] for b in boots if b["pid"] == pid)

    def first_step(self, round_: int, world: int) -> float | None:
        """When every rank had completed its first step of `round_` (None: not yet)."""
        firsts = []
        for rank in range(world):
            times = [r["t"] for r in read_jsonl(os.path.join(self.out, f"ids.run.rank{rank}.jsonl"))
                     if r["round"] == str(round_)]
            if not times:
                return None
            firsts.append(min(times))
        return max(firsts)

    def steps_in(self, round_: int) -> int:
        return sum(r["round"] == str(round_) for r in read_jsonl(os.path.join(self.out, "ids.run.rank0.jsonl")))

    def settled(self, round_: int) -> bool:
        """3 steps made in `round_`, and a's spares ready since its workers last started."""
        events = self.events()
        started = max((e["time"] for e in events if e["event"] == "workers_started"), default=float("inf"))
        return self.steps_in(round_) >= 3 and any(
            e["event"] == "spares_ready" and e["time"] > started for e in events)


def run_mode(mode: str, cycles: int, endpoint: str, base: str, last_call: float,
             setup: float) -> dict[str, list[float]]:
    out = tempfile.mkdtemp(prefix=f"{mode}-", dir=base)
    job = Job(out, endpoint, mode, last_call, setup)
    found: dict[str, list[float]] = {"growth": [], "leave": []}
    round_ = 0
    try:
        wait("round 0 settled", lambda: job.settled(0), [job.a])
        for cycle in range(cycles):
            b = job.agent(f"b{cycle}")
            grown = wait(f"cycle {cycle}: a step at world 2", lambda: job.first_step(round_ + 1, 2), [job.a, b])
            decided = next(e["time"] for e in job.events() if e["event"] == "growing" and e["round"] == round_)
            found["growth"].append(grown - max(decided, job.script_started(f"b{cycle}", round_ + 1)))
            round_ += 1
            wait(f"cycle {cycle}: round {round_} settled", lambda: job.settled(round_), [job.a, b])
            left = time.time()
            b.send_signal(signal.SIGTERM)
            shrunk = wait(f"cycle {cycle}: a step at world 1", lambda: job.first_step(round_ + 1, 1), [job.a])
            found["leave"].append(shrunk - left)
            b.wait(60)
            round_ += 1
            wait(f"cycle {cycle}: round {round_} settled", lambda: job.settled(round_), [job.a])
            print(f"  {mode} cycle {cycle}: growth {found['growth'][-1]:.2f}s, leave {found['leave'][-1]:.2f}s",
                  flush=True)
        pids = {tuple(e["pids"]) for e in job.events() if e["event"] in ("workers_started", "workers_reconfigured")}
        print(f"  {mode}: a's worker pids over {2 * cycles + 1} rounds: {len(pids)} distinct", flush=True)
    finally:
        job.a.send_signal(signal.SIGTERM)
        try:
            job.a.wait(60)
        except subprocess.TimeoutExpired:
            job.a.kill()
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=5, help="growths (and leaves) per mode (default 5)")
    p.add_argument("--last-call", type=float, default=3.0, help="seconds a waiting node is debounced")
    p.add_argument("--setup-seconds", type=float, default=0.0,
                   help="the script's set-up time after elastic.init() (default 0)")
    p.add_argument("--out", default=None, help="keep the runs' files here (default: a temp dir)")
    args = p.parse_args()
    base = args.out or tempfile.mkdtemp(prefix="bench-resize-")
    os.makedirs(base, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}; set-up {args.setup_seconds:g} s", flush=True)
    with EtcdServer() as etcd:
        results = {mode: run_mode(mode, args.cycles, etcd.endpoint, base, args.last_call, args.setup_seconds)
                   for mode in (RECONFIGURE, RESTART)}
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"{'change':8} {'mode':12} {'p50 s':>8} {'p95 s':>8}  n")
    for change in ("growth", "leave"):
        for mode in (RECONFIGURE, RESTART):
            values = results[mode][change]
            print(f"{change:8} {mode:12} {statistics.median(values):8.3f} {pct(values, 95):8.3f}  {len(values)}")
    for change in ("growth", "leave"):
        ratio = statistics.median(results[RECONFIGURE][change]) / statistics.median(results[RESTART][change])
        print(f"ratio {change} p50 reconfigure/restart: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
