"""The loop's invariants with real processes (gloo, float64, the torchrun environment).

One uninterrupted run at world size 2 is the reference. An interrupted run (a rank
SIGKILLed at a random step, all relaunched) must end bitwise equal to it; a run resized
2 -> 1 -> 3 (stopped by SIGTERM, then by max_steps; DDP, then a plain module, then FSDP2)
within 1e-7. Every run must feed each step exactly the reference's sample ids, with
ceil(G/(m*W)) micro-steps. The loader's worker processes (num_workers) and torch.compile
change none of this.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from elastic.exchange.progress import read_progress
from elastic.worker.sampler import ElasticSampler
from helpers import alive, child_env, wait_gone
from loop_launch import Group
from loop_worker import loader_workers

G, M, STEPS, SAVE_EVERY = 7, 1, 12, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(out, tag, ckpt, *extra):
    """Worker arguments; ckpt=None leaves the directory to elastic-run's --checkpoint-dir."""
    return ["--out", str(out), "--tag", tag, *(["--ckpt", str(ckpt)] if ckpt else []),
            "--global-batch", str(G), "--micro-batch", str(M), "--max-steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), *map(str, extra)]


def step_records(out, tag, world):
    """[(step, world, A, ids concatenated over ranks in rank order)] in the order run."""
    by_rank = []
    for r in range(world):
        with open(out / f"ids.{tag}.rank{r}.jsonl") as f:
            by_rank.append([json.loads(line) for line in f])
    assert len({len(rows) for rows in by_rank}) == 1, "ranks recorded different numbers of steps"
    rows = []
    for per_rank in zip(*by_rank):
        assert len({row["step"] for row in per_rank}) == 1, per_rank
        first = per_rank[0]
        rows.append((first["step"], first["world"], first["A"], [i for row in per_rank for i in row["ids"]]))
    return rows


def check_records(rows, reference_ids):
    for step, world, a, ids in rows:
        assert a == math.ceil(G / (M * world)), f"step {step} at world size {world}: A={a}"
        assert ids == reference_ids[step], f"step {step} at world size {world}"


def params(out, tag):
    return torch.load(out / f"params.{tag}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    Group(args(out, "ref", out / "ckpt"), 2, child_env(), progress_dir=str(out)).wait_ok()
    rows = step_records(out, "ref", 2)
    assert [r[0] for r in rows] == list(range(STEPS))
    ids = {step: got for step, _, _, got in rows}
    sampler = ElasticSampler(30, G, seed=5)
    assert ids == {s: list(sampler.samples(s).ids) for s in range(STEPS)}
    for r in range(2):  # the heartbeat file holds the last completed step and the final commit
        progress = read_progress(str(out / f"progress.rank{r}"))
        assert progress.step == STEPS and progress.commits[-1].step == STEPS and progress.commits[-1].stall >= 0
    return out, ids


def loader_pids(path):
    pids = {w["pid"] for w in loader_workers(path)}
    assert len(pids) == 4, f"expected 2 loader workers on each of 2 ranks, got {pids}"
    return pids


@pytest.mark.parametrize("overlap", [[], ["--overlap-save"], ["--num-workers", 2, "--compile"]],
                         ids=["copy-then-write", "overlap-save", "loader-workers-compiled"])
def test_sigkill_at_a_random_step_then_resume_is_bitwise(tmp_path, reference, overlap):
    """With overlap_save the snapshot copies run during the next step's forwards; with loader
    workers and a compiled DDP model the samples, their order and the result stay the same,
    and the loader workers end with their rank, killed or not."""
    ref_out, ref_ids = reference
    kill_at = random.Random(os.environ.get("TEST_SEED", "6")).randint(4, STEPS - 2)
    ckpt = tmp_path / "ckpt"
    group = Group(args(tmp_path, "killed", ckpt, "--kill-at", kill_at, *overlap), 2, child_env())
    victim = group.procs[1]
    victim.wait(timeout=200)
    assert victim.returncode == -signal.SIGKILL, f"kill_at={kill_at}: rank 1 exited {victim.returncode}"
    group.kill()  # the survivor is stuck in (or failed out of) a collective, as under a supervisor
    # group.wait() (the killed ranks' output) comes last: its pipes close only once the killed
    # ranks' loader workers have seen their parent gone, which the resumed run need not wait for.
    outs = Group(args(tmp_path, "resumed", ckpt, *overlap), 2, child_env()).wait_ok()
    # Saves run at the boundary after every SAVE_EVERY-th step, and the worker waits for the
    # commit before the kill, so the resume step is the last multiple of SAVE_EVERY <= kill_at.
    resumed_from = kill_at // SAVE_EVERY * SAVE_EVERY
    assert f"rank 0 resumed {resumed_from}" in outs[0], (kill_at, outs[0])
    rows = step_records(tmp_path, "killed", 2) + step_records(tmp_path, "resumed", 2)
    check_records(rows, ref_ids)
    assert [r[0] for r in step_records(tmp_path, "resumed", 2)] == list(range(resumed_from, STEPS))
    ref, got = params(ref_out, "ref"), params(tmp_path, "resumed")
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"kill_at={kill_at}: {k} differs by {(got[k] - ref[k]).abs().max()}"
    if "--num-workers" in overlap:  # the killed ranks' loader workers see their parent gone
        assert not any(alive(pid) for pid in loader_pids(tmp_path / "loader_pids.resumed"))
        assert wait_gone(loader_pids(tmp_path / "loader_pids.killed"), timeout=15) == set()
    group.wait()


def test_resize_2_then_1_then_3_with_fsdp2_matches_within_1e7(tmp_path, reference):
    ref_out, ref_ids = reference
    ckpt = tmp_path / "ckpt"
    # Phase 1, world size 2: both ranks pause in step 4, get SIGTERM, then continue; they
    # agree on the flag at the next boundary (stop_check_every=1) and save step 5. The
    # SIGTERM goes to each rank's whole process group, as elastic-run, torchrun and Slurm
    # send it: the rank's 2 loader workers get it too and must not end before the save.
    phase1 = Group(args(tmp_path, "p1", ckpt, "--pause-at", 4, "--num-workers", 2), 2, child_env(), stdin=True,
                   new_session=True)
    for p in phase1.procs:
        while "paused at 4" not in (line := p.stdout.readline()):
            assert line, "worker exited before pausing"
    for p in phase1.procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in phase1.procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for rank, p in enumerate(phase1.procs):  # both ranks saved step 5 and exited
        assert p.wait(timeout=200) == 143, f"rank {rank} exited {p.returncode}"
    # Phase 2: one plain process (no launcher environment), up to step 9. Phase 1's loader
    # workers end meanwhile (their pipes to phase1.wait() close only then): checked after.
    out2 = Group(args(tmp_path, "p2", ckpt, "--max-steps", 9), 1, child_env(), torchrun_env=False).wait_ok()
    for rank, (rc, _, err) in enumerate(phase1.wait()):
        assert rc == 143, f"rank {rank} exited {rc}: {err[-3000:]}"
    assert wait_gone(loader_pids(tmp_path / "loader_pids.p1")) == set()
    assert "rank 0 resumed 5" in out2[0]
    # Phase 3: world size 3 with FSDP2 (fully_shard): the replicated state is resharded.
    out3 = Group(args(tmp_path, "p3", ckpt, "--fsdp"), 3, child_env()).wait_ok()
    assert "rank 0 resumed 9" in out3[0]
    rows = step_records(tmp_path, "p1", 2) + step_records(tmp_path, "p2", 1) + step_records(tmp_path, "p3", 3)
    assert [r[0] for r in rows] == list(range(STEPS))
    assert [r[1] for r in rows] == [2] * 5 + [1] * 4 + [3] * 3
    check_records(rows, ref_ids)
    ref, got = params(ref_out, "ref"), params(tmp_path, "p3")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7)


def elastic_run(*argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", "2", *map(str, argv)],
        env=dict(child_env(), OMP_NUM_THREADS="1"), cwd=cwd, capture_output=True, text=True,
        timeout=240,
    )


def test_supervisor_restarts_a_sigkilled_rank_and_the_run_ends_bitwise(tmp_path, reference):
    """Under elastic-run: rank 1 SIGKILLs itself at step 8; the supervisor restarts the
    group, which resumes from step 6 (--checkpoint-dir) and ends equal to the reference."""
    ref_out, ref_ids = reference
    worker = os.path.join(REPO, "tests", "loop_worker.py")
    done = elastic_run("--max-restarts", "1", "--checkpoint-dir", tmp_path / "ckpt", worker,
                       *args(tmp_path, "sup", None, "--kill-at", 8), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed 6" in done.stdout, done.stdout
    check_records(step_records(tmp_path, "sup", 2) + step_records(tmp_path, "sup.restart1", 2), ref_ids)
    assert [r[0] for r in step_records(tmp_path, "sup.restart1", 2)] == list(range(6, STEPS))
    ref, got = params(ref_out, "ref"), params(tmp_path, "sup.restart1")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_minimal_example_under_elastic_run(tmp_path):
    done = elastic_run(os.path.join(REPO, "examples", "minimal_ddp.py"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done at step 200" in done.stdout
    assert "world 2 accumulation 2" in done.stdout
    (run_dir,) = (tmp_path / "checkpoints").iterdir()  # no --checkpoint-dir: ./checkpoints/<run id>
    assert "step_000000000200" in os.listdir(run_dir)
