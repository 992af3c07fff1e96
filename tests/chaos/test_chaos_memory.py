"""Chaos with the checkpoint memory tier (tests/scripts/memory_worker.py: memory saves every
step, no durable save).

The first test: `elastic-run --standalone`, 2 ranks, two SIGKILLs of rank 1.

1. Killed after committing step 3 in memory: the agent saves at breakpoint (step 3 promoted
   to --checkpoint-dir, while the next round starts: it resumes from the memory checkpoint
   of step 3, which the agent pinned, so the round's memory saves keep it under the copy).
2. Killed after committing step 7, with a byte of the memory shard flipped first: the agent
   does not promote it (it verifies every byte first), and the next round falls back to step 3
   (durable, or still in memory while pinned for its promotion) with a warning naming the shard file.
The job then ends with weights bitwise equal to an uninterrupted run, and the agent has
removed the node's memory directory.

The second: two agents (1 rank each) on one etcd; once one holds a copy of the other's newest
memory checkpoint, the other is lost whole (agent and worker SIGKILLed, its memory directory
deleted). Then either the survivor goes on alone (shrink, --nnodes 1:2) or a spare takes the
lost node's place (--nnodes 2; its workers read the step from the survivor's memory, over its
agent's server); either way the round resumes from memory (the survivor's own shards and its
copy of the lost node's) at the step of the fault, ending within 1e-7 of the reference, bitwise
with the spare; and the survivor's agent alone saves that step at breakpoint (its own shard and
the copy's). With three agents (shrink3, --nnodes 2:3) the two survivors each lack a shard the
other holds (its own, or its copy of the lost node's) and read it from the other as they restore.

The third: planned growth (--nnodes 2:3): the round of three restores from memory, the new
node reading every chunk from the others', durable storage untouched.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from chaos_lib import read_events, wait_until
from checkpoint import CheckpointManager
from elastic.launcher.memory_dir import path as memory_dir_path
from helpers import SCRIPTS, Job, child_env

pytestmark = pytest.mark.timeout(300)


def test_resume_from_memory_then_fall_back_from_a_corrupt_memory_shard(tmp_path):
    sys.path.insert(0, SCRIPTS)
    from memory_worker import reference

    out, logs, ckpt = tmp_path / "out", tmp_path / "logs", tmp_path / "ckpt"
    out.mkdir()
    cmd = [sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.05",
           "--max-restarts", "2", "--rdzv-conf", "cooldown_base=0.2", "--log-dir", str(logs),
           "--checkpoint-dir", str(ckpt), os.path.join(SCRIPTS, "memory_worker.py"), str(out), "3,7"]
    with open(tmp_path / "console.log", "w") as console:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=console, stderr=subprocess.STDOUT)
    try:
        def dead():
            return None if proc.poll() is None else (tmp_path / "console.log").read_text()[-4000:]

        paused = wait_until("rank 1 paused at step 3", lambda: _read(out / "paused-3.json"), 120, alive=dead)
        os.kill(paused["pid"], signal.SIGKILL)

        paused = wait_until("rank 1 paused at step 7", lambda: _read(out / "paused-7.json"), 120, alive=dead)
        shards = sorted(glob.glob(os.path.join(paused["memory_dir"], "step_000000000007", "*.safetensors")))
        assert shards, os.listdir(paused["memory_dir"])
        with open(shards[0], "r+b") as f:  # the last byte is tensor data
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x01]))
        os.kill(paused["pid"], signal.SIGKILL)
        assert proc.wait(120) == 0, (tmp_path / "console.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    events = read_events(logs / "events.jsonl")
    promoted = [e for e in events if e["event"] == "memory_checkpoint_promoted"]
    assert [e["step"] for e in promoted] == [3], events
    # Alongside the next round: the agent did not wait for the promotion to start its workers.
    started = [i for i, e in enumerate(events) if e["event"] == "workers_started" and e["round"] == 1]
    assert started and started[0] < events.index(promoted[0]), events
    assert CheckpointManager(str(ckpt)).verify(3) == 3
    refused = [e for e in events if e["event"] == "memory_checkpoint_not_promoted"]
    assert len(refused) == 1 and "checksum" in refused[0]["reason"] and "step_000000000007" in refused[0]["reason"]

    lines = (out / "restores.jsonl").read_text().splitlines()
    restores = {(r["restart"], r["rank"]): r for r in map(json.loads, lines)}
    for rank in (0, 1):
        assert restores[0, rank]["step"] is None
        assert (restores[1, rank]["step"], restores[1, rank]["tier"]) == (3, "memory")
        # Step 3 from durable storage, or from memory while the agent still pins it there for
        # its promotion (kept until it takes the answer): both verified, both the same bytes.
        assert restores[2, rank]["step"] == 3 and restores[2, rank]["tier"] in ("durable", "memory")
    warned = " ".join(restores[2, 0]["warnings"] + restores[2, 1]["warnings"])
    assert os.path.basename(shards[0]) in warned and "falling back to step 3" in warned, warned

    assert json.loads((out / "final.json").read_text()) == reference()
    assert not os.path.exists(paused["memory_dir"]), "the agent removes the memory directory at job end"


@pytest.mark.parametrize("then", ["shrink", "spare", "shrink3"])
def test_a_node_lost_whole_resumes_from_the_copy_in_the_survivor_s_memory(tmp_path, etcd_server, run_id, then):
    sys.path.insert(0, SCRIPTS)
    from memory_worker import reference

    out = tmp_path / "out"
    out.mkdir()
    nnodes = {"shrink": "1:2", "spare": "2", "shrink3": "2:3"}[then]
    started = ["a", "b", "c"] if then == "shrink3" else ["a", "b"]
    job = Job(etcd_server.endpoint, run_id, tmp_path, nnodes, conf="last_call_timeout=1,cooldown_base=0.2",
              script=os.path.join(SCRIPTS, "memory_worker.py"), script_args=[str(out), "3"],
              flags=("--checkpoint-dir", str(tmp_path / "ckpt"), "--monitor-interval", "0.05"))
    try:
        for node in started:
            job.start(node)

        def dead():
            gone = {n: p.returncode for n, p in job.agents.items() if p.poll() is not None}
            return "\n".join(f"--- {n} exited {c}\n{job.log(n)[-3000:]}" for n, c in gone.items()) or None

        paused = wait_until("rank 1 paused at step 3", lambda: _read(out / "paused-3.json"), 120, alive=dead)
        lost = paused["node"]
        survivors = sorted(set(started) - {lost})
        copies = {n: os.path.join(memory_dir_path(run_id, n), "replicas", lost, "step_000000000003", "manifest.json")
                  for n in survivors}
        survivor = wait_until(f"a survivor to hold {lost}'s step 3",  # its ring successor
                              lambda: next((n for n in survivors if os.path.exists(copies[n])), None), 60, alive=dead)
        copy = copies[survivor]
        assert glob.glob(os.path.join(os.path.dirname(copy), "*.safetensors")), "the lost node held a shard"

        os.kill(job.agents[lost].pid, signal.SIGKILL)  # the node lost whole: agent, worker, memory
        job.agents[lost].wait()
        try:
            os.kill(paused["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone with its agent
        shutil.rmtree(paused["memory_dir"])
        if then == "spare":
            job.start("c")  # in the lost node's place: the same world size
        nodes = {"shrink": [survivor], "spare": [survivor, "c"], "shrink3": survivors}[then]
        for node in nodes:
            assert job.agents[node].wait(120) == 0, job.log(node)[-4000:]
    finally:
        job.kill_all()

    restores = [json.loads(line) for line in (out / "restores.jsonl").read_text().splitlines()]
    resumed = [r for r in restores if r["restart"] > 0]
    world = len(nodes)
    assert [(r["world"], r["step"], r["tier"]) for r in resumed] == [(world, 3, "memory")] * world, restores
    assert not any(r["warnings"] for r in resumed), resumed
    final, ref = json.loads((out / "final.json").read_text()), reference()
    if then == "spare":  # the same world size: the same sums, bitwise
        assert final == ref
    assert max(abs(x - y) for x, y in zip(final, ref)) <= 1e-7, (final, ref)
    # Every node of the new round restored from memory; those lacking a shard read it from a
    # peer: the spare, and with three nodes a survivor lacking the lost node's shard (the copy
    # is on its ring successor) or the other survivor's (which shards hold data depends on
    # the byte split of the state over 3 ranks).
    assert sorted(r["node"] for r in resumed) == sorted(nodes)
    from_peers = {r["node"] for r in resumed if r["peer_bytes"] > 0}
    if then == "shrink3":
        assert from_peers, resumed
    else:
        assert from_peers == ({"c"} if then == "spare" else set()), resumed

    pulled = [e for e in job.events(survivor) if e["event"] == "memory_replica_pulled"]
    assert any(e["peer"] == lost and e["step"] == 3 and e["bytes"] > 0 for e in pulled), pulled
    # Saved at breakpoint by the survivors: their own shards and the lost node's from a copy.
    promoted = [e for n in survivors for e in job.events(n) if e["event"] == "memory_checkpoint_promoted"]
    assert [e["step"] for e in promoted] == [3], [job.events(n) for n in survivors]
    durable = CheckpointManager(str(tmp_path / "ckpt"))
    assert durable.steps() == [3] and durable.verify(3) == 3
    assert not any(os.path.exists(memory_dir_path(run_id, n)) for n in survivors), \
        "the agents remove their memory directories, copies included"


def test_a_node_added_by_growth_restores_from_its_peers_memory(tmp_path, etcd_server, run_id):
    """Planned growth (--nnodes 2:3, a third agent joins): the round of three restores the
    newest memory step; the new node, empty, reads every chunk from the others' memory, and
    durable storage is never written or read (no failure: nothing is saved at breakpoint)."""
    sys.path.insert(0, SCRIPTS)
    from memory_worker import reference

    out = tmp_path / "out"
    out.mkdir()
    job = Job(etcd_server.endpoint, run_id, tmp_path, "2:3", conf="last_call_timeout=1,cooldown_base=0.2",
              script=os.path.join(SCRIPTS, "memory_worker.py"), script_args=[str(out), "3"],
              flags=("--checkpoint-dir", str(tmp_path / "ckpt"), "--monitor-interval", "0.05"))
    try:
        job.start("a")
        job.start("b")
        wait_until("rank 1 paused at step 3", lambda: _read(out / "paused-3.json"), 120)
        job.start("c")  # the round grows; the paused workers are stopped with it
        for node in "abc":
            assert job.agents[node].wait(120) == 0, job.log(node)[-4000:]
    finally:
        job.kill_all()

    restores = [json.loads(line) for line in (out / "restores.jsonl").read_text().splitlines()]
    resumed = [r for r in restores if r["step"] is not None]
    assert sorted((r["node"], r["world"], r["step"], r["tier"]) for r in resumed) == \
        [(n, 3, 3, "memory") for n in "abc"], restores
    assert not any(r["warnings"] for r in resumed), resumed
    assert {r["node"] for r in resumed if r["peer_bytes"] > 0} == {"c"}, resumed
    final, ref = json.loads((out / "final.json").read_text()), reference()
    assert max(abs(x - y) for x, y in zip(final, ref)) <= 1e-7, (final, ref)
    assert CheckpointManager(str(tmp_path / "ckpt")).steps() == []


def _read(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
