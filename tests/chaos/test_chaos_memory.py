"""Chaos with the checkpoint memory tier: `elastic-run --standalone`, 2 ranks, memory saves
every step, no durable save, two SIGKILLs of rank 1 (tests/scripts/memory_worker.py).

1. Killed after committing step 3 in memory: the agent saves at breakpoint (step 3 promoted
   to --checkpoint-dir) and the next round resumes from the memory checkpoint of step 3.
2. Killed after committing step 7, with a byte of the memory shard flipped first: the agent
   does not promote it (it verifies every byte first), and the next round falls back to the
   durable step 3 with a warning naming the shard file.
The job then ends with weights bitwise equal to an uninterrupted run, and the agent has
removed the node's memory directory.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from chaos_lib import read_events, wait_until
from helpers import SCRIPTS, child_env

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
    refused = [e for e in events if e["event"] == "memory_checkpoint_not_promoted"]
    assert len(refused) == 1 and "checksum" in refused[0]["reason"] and "step_000000000007" in refused[0]["reason"]

    lines = (out / "restores.jsonl").read_text().splitlines()
    restores = {(r["restart"], r["rank"]): r for r in map(json.loads, lines)}
    for rank in (0, 1):
        assert restores[0, rank]["step"] is None
        assert (restores[1, rank]["step"], restores[1, rank]["tier"]) == (3, "memory")
        assert (restores[2, rank]["step"], restores[2, rank]["tier"]) == (3, "durable")
    warned = " ".join(restores[2, 0]["warnings"] + restores[2, 1]["warnings"])
    assert os.path.basename(shards[0]) in warned and "falling back to step 3" in warned, warned

    assert json.loads((out / "final.json").read_text()) == reference()
    assert not os.path.exists(paused["memory_dir"]), "the agent removes the memory directory at job end"


def _read(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
