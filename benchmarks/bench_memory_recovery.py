"""The checkpoint memory tier under faults: recovery time, work lost, goodput; against disk and torchrun.

Run:  python benchmarks/bench_memory_recovery.py [--mib 256] [--faults 3] [--duration 300] [--period 20]

Three set-ups of one job (benchmarks/_memory_job.py: world size --world-size on one node, gloo,
CPU; a small MLP plus one tensor that makes the checkpointed state --mib MiB), one after the other:
  memory:   elastic-run, TrainLoop(memory_save_every=1, save_every=50)
  disk:     elastic-run, TrainLoop with durable saves only (save_every=1 in part 1, 50 after)
  torchrun: torchrun running the hand-written loop: rank 0 torch.save()s (every step in part 1,
            every 50 after), every rank torch.load()s
1. recovery: --faults times, a seeded random rank is SIGKILLed (once its attempt has done 3
   steps and --settle seconds have passed). Time to recover = the fault -> the first step
   completed by every rank of the next attempt, split into start (fault -> script running; the
   agent's promotion of the newest memory checkpoint to durable storage runs beside the next
   round, and its own time is shown apart), import + process group, load (the checkpoint, read back) and the first
   step. Every set-up saves after every step here (memory: into memory), so all resume from about the step they were
   killed at; "behind" is the steps completed before the fault minus the step resumed from.
   "durable read" is the bytes of files under the durable checkpoint directory read after the
   fault: those whose access time moved past their modification time and the fault (ext4
   relatime updates it on the first read after a write). The disk and torchrun rows are the
   check that this method sees reads; "tier" is where load() says it read from (the events log's
   checkpoint_restored for elastic-run, the worker's own record for torchrun). Files stay in the
   page cache, as they would on a node whose worker, not the node, died.
2. work lost: a tiny state (--work-mib), durable saves every 50 steps, rank 1 SIGKILLs itself
   once --kill-at (137) steps are complete (the checkpoint in flight not awaited): the steps done again
   after the restart. Memory saves every step should lose 0 or 1; durable-only saves lose 37.
3. goodput: --duration seconds of training with a seeded random rank SIGKILLed every --period
   seconds (the next fault waits for the new attempt to run), durable saves every 50 steps:
   useful step time / --duration (from the launch), where useful step time is the compute
   (forward, backward; not checkpoint stalls; the ranks' mean) of the steps whose work was
   kept: the last execution of each step. The state (--goodput-mib) and the compute per step
   (--hidden, --batch) set how much a save per step costs against a step.
   Steps after the last checkpoint when the run is stopped are counted as kept for every set-up.
The set-ups run one after the other, not interleaved: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from _common import exited, read_jsonl, wait_until
from bench_recovery import OURS, TORCHRUN, NotRecovered, kill_leftovers, launch_command

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_memory_job.py")
MEMORY, DISK = "memory", "disk"
SETUPS = (MEMORY, DISK, TORCHRUN)


@dataclass
class Job:
    """One launched job of one set-up and what its workers and agent wrote."""

    setup: str
    out: str
    world: int
    timeout: float
    proc: subprocess.Popen = field(init=False)

    def start(self, save_every: int, job_args: list[str], restarts: int) -> Job:
        os.makedirs(self.out)
        self.ckpt = os.path.join(self.out, "ckpt")
        os.makedirs(self.ckpt)
        mode = "torchrun" if self.setup == TORCHRUN else "loop"
        job = [JOB, "--mode", mode, "--out", self.out, "--ckpt", self.ckpt, "--save-every", str(save_every),
               *(["--memory-save-every", "1"] if self.setup == MEMORY else []), *job_args]
        cmd, env = launch_command(TORCHRUN if self.setup == TORCHRUN else OURS, self.world, restarts, self.out, job,
                                  ("--checkpoint-dir", self.ckpt))
        self._log = open(os.path.join(self.out, "console.log"), "w")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def boot(self, attempt: int) -> dict[int, dict] | None:
        """Every rank's boot record of `attempt`, once all exist."""
        recs = [read_jsonl(os.path.join(self.out, f"boot.a{attempt}.rank{r}.jsonl")) for r in range(self.world)]
        return {r: rec[-1] for r, rec in enumerate(recs)} if all(recs) else None

    def steps(self, attempt: int) -> dict[int, list[dict]]:
        return {r: read_jsonl(os.path.join(self.out, f"steps.a{attempt}.rank{r}.jsonl")) for r in range(self.world)}

    def events(self) -> list[dict]:
        return read_jsonl(os.path.join(self.out, "logs", "events.jsonl"))

    def spares_ready(self, since: float) -> bool:
        """elastic-run's warm spares (started once a round is under way) are ready."""
        return self.setup == TORCHRUN or any(e["event"] == "spares_ready" and e["time"] >= since
                                             for e in self.events())

    def wait(self, what: str, check):
        return wait_until(f"{self.setup}: {what}", check, self.timeout, alive=exited([self.proc], "the launcher"),
                          error=NotRecovered)

    def next_attempt(self, after: int, ran: int = 1) -> int:
        """The newest attempt after `after` whose every rank completed `ran` steps (a launcher may
        need more than one restart to get going again)."""
        return self.wait(f"{ran} steps of an attempt after {after}", lambda: [
            a for a in range(after + 1, after + 4) if all(len(v) >= ran for v in self.steps(a).values())])[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        kill_leftovers(self.out)
        self._log.close()


def durable_read(root: str, since: float) -> int:
    """Bytes of the files under `root` first read after `since` (see the module doc)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            if st.st_atime > max(since, st.st_mtime):
                total += st.st_size
    return total


def completed(job: Job, attempt: int) -> int:
    """Steps completed by every rank of `attempt` (a record is written as its step's compute ends)."""
    return min((v[-1]["step"] + 1 if v else 0) for v in job.steps(attempt).values())


def recovery(setup: str, args: argparse.Namespace, base: str) -> list[dict]:
    # Memory: durable saves every 50 steps (none before the faults), a memory save every step.
    job = Job(setup, os.path.join(base, f"recovery-{setup}"), args.world_size, args.timeout).start(
        50 if setup == MEMORY else 1, ["--mib", str(args.mib)], 3 * args.faults)
    rng, results, attempt, since = random.Random(args.seed), [], 0, 0.0
    try:
        job.wait("the first attempt's steps", lambda: job.boot(0) and all(len(v) >= 3 for v in job.steps(0).values()))
        for _ in range(args.faults):
            # Faults are far apart: the warm spares and the standby promotion are ready.
            time.sleep(args.settle)
            job.wait("spares ready", lambda: job.spares_ready(since))
            victim = rng.randrange(args.world_size)
            before = completed(job, attempt)
            fault = time.time()
            os.kill(job.boot(attempt)[victim]["pid"], signal.SIGKILL)
            new = job.next_attempt(attempt)
            read = durable_read(job.ckpt, fault)  # now: before retention deletes the step resumed from
            boot = job.wait("boot records", lambda: job.boot(new))
            first = max(v[0]["end"] for v in job.steps(new).values())
            after = [e for e in job.events() if e["time"] >= fault]
            restored = next((e for e in after if e["event"] == "checkpoint_restored"), None)
            promoted = next((e["seconds"] for e in after if e["event"] == "memory_checkpoint_promoted"), 0.0)
            item = {"total": first - fault, "start": min(b["started"] for b in boot.values()) - fault,
                    "promote": promoted,
                    "import_pg": max(b["initialized"] - b["started"] for b in boot.values()),
                    "load": max(b["resumed"] - b["initialized"] for b in boot.values()),
                    "first_step": first - max(b["resumed"] for b in boot.values()),
                    "behind": before - boot[0]["step"], "read_mib": read / 2**20,
                    "tier": restored["tier"] if restored else boot[0]["tier"]}
            results.append(item)
            print(f"{setup} fault: rank {victim} -> recovered in {item['total']:.2f}s from {item['tier']} "
                  f"(step {boot[0]['step']}, {item['behind']} behind, {item['read_mib']:.1f} MiB durable read)",
                  file=sys.stderr, flush=True)
            attempt, since = new, fault
            job.wait("3 steps", lambda: all(len(v) >= 3 for v in job.steps(attempt).values()))
    except NotRecovered as exc:
        print(f"{setup}: NOT RECOVERED: {exc}", file=sys.stderr, flush=True)
        results.append({"failed": str(exc)})
    finally:
        job.stop()
    return results


def work_lost(setup: str, args: argparse.Namespace, base: str) -> dict:
    job = Job(setup, os.path.join(base, f"work-{setup}"), args.world_size, args.timeout).start(
        50, ["--mib", str(args.work_mib), "--kill-at", str(args.kill_at), "--max-steps", str(args.kill_at + 5)], 3)
    try:
        new = job.next_attempt(0)
        done, resumed = completed(job, 0), job.boot(new)[0]["step"]
        redone = [s for s in job.steps(0)[0] if s["step"] >= resumed]
        result = {"completed": done, "resumed": resumed, "redone": done - resumed,
                  "redone_s": sum(s["end"] - s["start"] for s in redone), "tier": job.boot(new)[0]["tier"]}
    except NotRecovered as exc:
        result = {"failed": str(exc)}
    finally:
        job.stop()
    print(f"{setup} work lost: {result}", file=sys.stderr, flush=True)
    return result


def kept_work(attempts: list[dict[int, list[dict]]], end: float) -> tuple[float, int, int]:
    """(compute seconds of the steps kept, steps kept, step executions) from each attempt's step
    records by rank: a step is kept in the last attempt in which every rank completed it before
    `end`; its time is the ranks' mean compute time (a rank's steps never overlap, the ranks' do)."""
    kept: dict[int, float] = {}
    runs = 0
    for recs in attempts:
        by_step: dict[int, list[dict]] = {}
        for rank_recs in recs.values():
            for s in rank_recs:
                if s["end"] <= end:
                    by_step.setdefault(s["step"], []).append(s)
        for step, execs in by_step.items():
            if len(execs) == len(recs):
                runs += 1
                kept[step] = statistics.fmean(s["end"] - s["start"] for s in execs)
    return sum(kept.values()), len(kept), runs


def goodput(setup: str, args: argparse.Namespace, base: str) -> dict:
    job = Job(setup, os.path.join(base, f"goodput-{setup}"), args.world_size, args.timeout).start(
        50, ["--mib", str(args.goodput_mib), "--hidden", str(args.hidden), "--global-batch", str(args.batch)],
        10 * int(args.duration / args.period) + 10)
    rng, faults, end, killed = random.Random(args.seed), 0, job.started + args.duration, -1
    try:
        for k in range(1, int(args.duration / args.period) + 1):
            due = job.started + k * args.period
            if due >= end:
                break
            time.sleep(max(0.0, due - time.time()))  # the fault schedule, not a synchronisation
            killed = job.next_attempt(killed)
            os.kill(job.boot(killed)[rng.randrange(args.world_size)]["pid"], signal.SIGKILL)
            faults += 1
        time.sleep(max(0.0, end - time.time()))
    except NotRecovered as exc:
        print(f"{setup}: NOT RECOVERED: {exc}", file=sys.stderr, flush=True)
    finally:
        job.stop()
    useful, steps, runs = kept_work([job.steps(a) for a in range(faults + 10)], end)
    result = {"goodput": useful / args.duration, "useful_s": useful, "faults": faults, "steps": steps,
              "redone": runs - steps}
    print(f"{setup} goodput: {result}", file=sys.stderr, flush=True)
    return result


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="recovery: state size in MiB")
    p.add_argument("--faults", type=int, default=3, help="recovery: faults per set-up")
    p.add_argument("--settle", type=float, default=3.0, help="recovery: seconds of training before each fault")
    p.add_argument("--work-mib", type=int, default=1, help="work lost: state size in MiB")
    p.add_argument("--kill-at", type=int, default=137, help="work lost: the step count at which rank 1 dies")
    p.add_argument("--duration", type=float, default=300, help="goodput: seconds of training per set-up")
    p.add_argument("--period", type=float, default=20, help="goodput: seconds between faults")
    p.add_argument("--goodput-mib", type=int, default=16, help="goodput: state size in MiB")
    p.add_argument("--hidden", type=int, default=1024, help="goodput: MLP width (compute per step)")
    p.add_argument("--batch", type=int, default=256, help="goodput: global batch (compute per step)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=180, help="seconds a recovery may take")
    p.add_argument("--only", choices=["recovery", "work", "goodput"], action="append",
                   help="run only these parts (repeatable; default: all three)")
    p.add_argument("--out", default=None, help="keep the runs' files here (default: a temp dir)")
    args = p.parse_args()
    if args.period <= 0 or args.duration < args.period:
        p.error(f"--duration {args.duration:g} --period {args.period:g}: the period must be > 0 and fit in the "
                "duration at least once")
    parts = args.only or ["recovery", "work", "goodput"]
    base = args.out or tempfile.mkdtemp(prefix="bench-memory-recovery-")
    failed = False

    if "recovery" in parts:
        rec = {s: recovery(s, args, base) for s in SETUPS}
        print(f"1. recovery from a SIGKILLed rank, {args.mib} MiB state, world size {args.world_size}, "
              f"a save after every step (memory: into memory), {args.faults} faults each (medians, s)")
        phases = ["total", "start", "promote", "import_pg", "load", "first_step", "behind", "read_mib"]
        print(f"{'':<11}" + "".join(f"{p:>11}" for p in phases) + "   tier")
        for s in SETUPS:
            ok = [r for r in rec[s] if "total" in r]
            failed |= len(ok) < args.faults
            cells = "".join(f"{statistics.median(r[p] for r in ok):>11.2f}" for p in phases) if ok else " -"
            print(f"{s:<11}{cells}   {','.join(sorted({r['tier'] for r in ok}))}")
        med = {s: statistics.median(r["total"] for r in rec[s] if "total" in r) if any("total" in r for r in rec[s])
               else 0.0 for s in SETUPS}
        print(f"ratios (total): memory/disk {ratio(med[MEMORY], med[DISK])}   memory/torchrun "
              f"{ratio(med[MEMORY], med[TORCHRUN])}   disk/torchrun {ratio(med[DISK], med[TORCHRUN])}")

    if "work" in parts:
        lost = {s: work_lost(s, args, base) for s in SETUPS}
        print(f"\n2. work lost: rank 1 SIGKILLed once {args.kill_at} steps are complete, durable saves every 50")
        print(f"{'':<11}{'completed':>10}{'resumed':>10}{'redone':>10}{'redone s':>10}   tier")
        for s in SETUPS:
            r = lost[s]
            failed |= "failed" in r
            print(f"{s:<11}" + (f"{r['completed']:>10}{r['resumed']:>10}{r['redone']:>10}{r['redone_s']:>10.2f}"
                                f"   {r['tier']}" if "failed" not in r else f" failed: {r['failed']}"))

    if "goodput" in parts:
        good = {s: goodput(s, args, base) for s in SETUPS}
        print(f"\n3. goodput: {args.duration:g} s each, a random rank SIGKILLed every {args.period:g} s, "
              f"{args.goodput_mib} MiB state, width {args.hidden}, batch {args.batch}, durable saves every 50 steps")
        print(f"{'':<11}{'goodput':>9}{'useful s':>10}{'faults':>8}{'steps':>8}{'redone':>8}")
        for s in SETUPS:
            r = good[s]
            print(f"{s:<11}{r['goodput']:>9.3f}{r['useful_s']:>10.1f}{r['faults']:>8}{r['steps']:>8}{r['redone']:>8}")
        print(f"ratios (goodput): memory/disk {ratio(good[MEMORY]['goodput'], good[DISK]['goodput'])}   "
              f"memory/torchrun {ratio(good[MEMORY]['goodput'], good[TORCHRUN]['goodput'])}")
    try:
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
