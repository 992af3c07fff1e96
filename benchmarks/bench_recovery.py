"""Time to recover from a worker crash: elastic-run against torchrun, same script, same run.

Run:  python benchmarks/bench_recovery.py [--faults 10] [--world-size 2] [--cold] [--out DIR]

For each launcher (ours: `elastic-run --standalone`, with its warm pool of spare workers;
with --cold also `elastic-run --no-warm-pool`; torchrun: `python -m torch.distributed.run
--standalone --max-restarts N`), one job of tests/loop_worker.py (tiny float64 model, CPU,
gloo, checkpoint every 5 steps) is started and a random rank (seeded) is SIGKILLed --faults
times. Each fault comes once the previous recovery has completed 3 steps, --settle seconds
have passed, and (warm pool) the agent logged its new spares ready: faults are hours apart
on real clusters, a spare's imports take seconds. Time to recover = fault -> the first
optimizer step completed by every rank of the new attempt. It is split into phases from
elastic-run's events.jsonl (detect = failure event, stop+rendezvous = next round sealed,
spawn = workers started, exec = workers started -> script running) and the workers' own
timestamps (import = script running -> torch and elastic imported, pg init = elastic.init()
returned, checkpoint load = loop built and resumed, first step). torchrun has no events log,
so its phases before the script runs are one "start" figure. Prints p50/p95 per phase and
launcher and the ratios ours/torchrun. The launchers run one after the other, not
interleaved: run it on an otherwise idle machine.

torchrun runs with its c10d rendezvous (what --standalone selects) and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. Without that variable (torch 2.13) its restarted
workers reuse the rendezvous' TCP store without a per-attempt key prefix, read the previous
attempt's gloo addresses from it, and fail in connectFullMesh ("Connection refused"): it did
not recover from a single fault here. With it, each attempt gets a fresh store.

Our job is run with --rdzv-conf cooldown_base=0.01: a standalone job has one node, and the
failing-node cooldown (a multi-node policy: keep a flaky node out while others can run)
would only add its delay; torchrun has no such policy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from _common import exited, pct, read_jsonl, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "loop_worker.py")


def records(out: str, world: int, restart: int, kind: str = "ids") -> dict[int, list[dict]]:
    tag = "b" if restart == 0 else f"b.restart{restart}"
    return {r: read_jsonl(os.path.join(out, f"{kind}.{tag}.rank{r}.jsonl")) for r in range(world)}


class NotRecovered(Exception):
    pass


OURS, COLD, TORCHRUN = "elastic-run", "elastic-run --no-warm-pool", "torchrun"


def launch_command(name: str, world: int, restarts: int, out: str, job: list[str],
                   ours: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `job` (a script and its arguments) under
    launcher `name` on one node, events log under OUT/logs (ours); `ours`: more flags for ours."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if name == TORCHRUN:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # see the module doc
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                "--max-restarts", str(restarts), "--monitor-interval", "0.05", *job], env
    return [sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", str(world),
            "--max-restarts", str(restarts), "--monitor-interval", "0.05", "--log-dir",
            os.path.join(out, "logs"), "--rdzv-conf", "cooldown_base=0.01",
            "--no-warm-pool" if name == COLD else "--warm-pool", *ours, *job], env


def run_launcher(name: str, faults: int, world: int, base: str, seed: int, timeout: float,
                 settle: float) -> list[dict]:
    """One job, `faults` faults; a fault not recovered from within `timeout` ends the series
    (recorded as {"failed": reason})."""
    out = os.path.join(base, name.replace(" ", ""))
    os.makedirs(out)
    job = [WORKER, "--out", out, "--tag", "b", "--ckpt", os.path.join(out, "ckpt"), "--max-steps", "100000",
           "--save-every", "5", "--step-delay", "0.02", "--global-batch", "8", "--micro-batch", "4"]
    cmd, env = launch_command(name, world, 3 * faults, out, job)
    events_path = os.path.join(out, "logs", "events.jsonl")

    def spares_ready(since: float) -> bool:
        return name != OURS or any(e["event"] == "spares_ready" and e["time"] >= since
                                   for e in read_jsonl(events_path))

    log = open(os.path.join(out, "console.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(what: str, check):
        return wait_until(f"{name}: {what}", check, timeout, alive=exited([proc], "the launcher"), poll=0.01,
                          error=NotRecovered)

    rng = random.Random(seed)
    results = []
    try:
        attempt, round_start = 0, 0.0
        for fault_no in range(faults):
            try:
                wait(f"3 steps of attempt {attempt}",
                     lambda: all(len(v) >= 3 for v in records(out, world, attempt).values()))
                time.sleep(settle)
                wait("spares ready", lambda: spares_ready(round_start))
                recs = records(out, world, attempt)
                victim = rng.randrange(world)
                fault = time.time()
                os.kill(recs[victim][-1]["pid"], signal.SIGKILL)

                def next_attempt():  # the launcher may need more than one restart to get going again
                    for later in range(attempt + 1, attempt + 2 + faults):
                        rs = records(out, world, later)
                        if all(rs.values()):
                            return later, rs
                    return None

                attempt, new = wait(f"first step after fault {fault_no + 1}", next_attempt)
                round_start = fault
                boots = wait(f"boot records of attempt {attempt}",
                             lambda: (lambda rs: rs if all(rs.values()) else None)(
                                 records(out, world, attempt, "boot")))
                first_step = max(v[0]["t"] for v in new.values())
                boot = {k: max(v[0][k] for v in boots.values()) for k in ("started", "imported", "initialized", "resumed")}
                item = {"total": first_step - fault, "start": boot["started"] - fault,
                        "import": boot["imported"] - boot["started"], "pg_init": boot["initialized"] - boot["imported"],
                        "ckpt_load": boot["resumed"] - boot["initialized"], "first_step": first_step - boot["resumed"]}
                events = read_jsonl(events_path)
                after = [e for e in events if e["time"] >= fault - 0.01]

                def at(kind: str) -> float | None:
                    return next((e["time"] for e in after if e["event"] == kind), None)

                if at("failure") and at("round_sealed") and at("workers_started"):
                    item.update(detect=at("failure") - fault, stop_rdzv=at("round_sealed") - at("failure"),
                                spawn=at("workers_started") - at("round_sealed"),
                                exec=boot["started"] - at("workers_started"))
                results.append(item)
                item["attempts"] = attempt
                print(f"{name} fault {fault_no + 1}/{faults}: rank {victim} -> recovered in {item['total']:.2f}s"
                      f" (attempt {attempt})",
                      file=sys.stderr, flush=True)
            except NotRecovered as exc:
                print(f"{name} fault {fault_no + 1}/{faults}: NOT RECOVERED: {exc}", file=sys.stderr, flush=True)
                results.append({"failed": str(exc)})
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_leftovers(out)
        log.close()
    return results


def kill_leftovers(out: str) -> None:
    """SIGKILL every process whose command line names this launcher's output directory:
    torchrun's workers run in sessions of their own and outlive a SIGKILLed torchrun."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = out.encode() in f.read()
            if named:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=10)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the runs' files here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=180, help="seconds a recovery may take before "
                   "the launcher's series is ended as not recovered")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of training between a recovery "
                   "and the next fault")
    p.add_argument("--cold", action="store_true", help="also run elastic-run --no-warm-pool")
    p.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    args = p.parse_args()
    base = args.out or tempfile.mkdtemp(prefix="bench-recovery-")
    names = [OURS, *([COLD] if args.cold else []), TORCHRUN]
    results = {name: run_launcher(name, args.faults, args.world_size, base, args.seed, args.timeout, args.settle)
               for name in names}
    phases = ["detect", "stop_rdzv", "spawn", "exec", "start", "import", "pg_init", "ckpt_load", "first_step", "total"]
    print(f"time to recover from a SIGKILLed rank, world size {args.world_size}, {args.faults} faults each (s)")
    heads = {OURS: "ours", COLD: "cold", TORCHRUN: "torchrun"}
    print(f"{'phase':<11}" + "".join(f"{heads[n] + ' p50':>14}{heads[n] + ' p95':>14}" for n in names))
    for phase in phases:
        row = f"{phase:<11}"
        for name in names:
            vals = [r[phase] for r in results[name] if phase in r]
            row += f"{pct(vals, 50):>14.2f}{pct(vals, 95):>14.2f}" if vals else f"{'-':>14}{'-':>14}"
        print(row)
    for name in names:
        failed = [r["failed"] for r in results[name] if "failed" in r]
        done = len(results[name]) - len(failed)
        print(f"{name}: {done} of {args.faults} faults recovered" + (f"; then: {failed[0]}" if failed else ""))
    totals = {name: [r["total"] for r in results[name] if "total" in r] for name in names}
    if not totals[OURS] or not totals[TORCHRUN]:
        return 1
    for name in names[:-1]:
        if totals[name]:
            print(f"ratio {heads[name]}/torchrun: p50 {pct(totals[name], 50) / pct(totals[TORCHRUN], 50):.2f}x   "
                  f"p95 {pct(totals[name], 95) / pct(totals[TORCHRUN], 95):.2f}x   (targets: <= 0.3x; ours p95 <= 2 s)")
    print("phases: start = fault -> script running (detect, stop, rendezvous, spawn, exec); "
          "exec = workers_started event -> script running (a warm spare: its assignment taken on)")
    try:
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
