"""The checkpoint memory tier (issue 18): saves into the node's shared memory, restores from
it first, falls back to durable storage when a memory shard does not verify, stays bounded,
refuses a state that does not fit, and is saved at breakpoint by `python -m checkpoint.promote`.

Real shared memory (a directory on /dev/shm, as elastic-run's agent makes one) and, for 2
ranks, real processes in a real gloo group: this file is also their script (see the end).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

from checkpoint import CheckpointManager
from checkpoint.cli.commands import main as elastic_ckpt
from checkpoint.collectives import RankGroup
from checkpoint.errors import CheckpointCorruptError
from checkpoint.memory_tier import SHM_ROOT, MemoryTier, free_bytes, room_problem
from checkpoint.promote import main as promote_main
from checkpoint.promote import promote
from elastic.exchange.env import MEMORY_DIR
from elastic.exchange.memory_layout import PIN_FILE, REPLICAS_DIR, REPLICATION_FILE

HERE = os.path.abspath(__file__)


@pytest.fixture
def memory_dir(monkeypatch):
    """The node's memory directory as the agent hands it over (ELASTIC_MEMORY_DIR)."""
    path = tempfile.mkdtemp(prefix="elastic-test-", dir=SHM_ROOT)
    monkeypatch.setenv(MEMORY_DIR, path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def step_dirs(root: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "step_*")))


def save_steps(url, steps, durable_steps=()) -> CheckpointManager:
    """Steps saved into memory, `durable_steps` also durably; w == step at each step."""
    ckpt = CheckpointManager(url, memory_tier=True)
    for step in steps:
        ckpt.save(step, {"w": torch.full((1000,), float(step)), "n": step}, durable=step in durable_steps)
    ckpt.wait()
    return ckpt


def test_memory_saves_restore_from_memory_and_keep_only_the_newest(tmp_path, memory_dir):
    ckpt = save_steps(tmp_path / "ckpt", range(1, 6), durable_steps=(2,))
    assert ckpt.steps() == [2], "durable=False writes nothing durable"
    assert step_dirs(memory_dir) == ["step_000000000005"], "after a commit a node keeps only that one"
    ckpt.close()
    assert os.path.isdir(memory_dir), "the agent's directory outlives the manager"

    restarted = CheckpointManager(tmp_path / "ckpt", memory_tier=True)  # a new worker after a failure
    state = {"w": torch.zeros(1000), "n": 0}
    assert restarted.load(state) == 5
    assert (restarted.restored.step, restarted.restored.tier) == (5, "memory")
    assert torch.equal(state["w"], torch.full((1000,), 5.0)) and state["n"] == 5
    assert restarted.load(state, step=2) == 2 and restarted.restored.tier == "durable"


def test_a_node_keeps_its_own_checkpoint_of_the_step_its_copy_of_a_peer_s_is_of(tmp_path, memory_dir):
    copy = os.path.join(memory_dir, REPLICAS_DIR, "peer", "step_000000000002")
    os.makedirs(copy)
    with open(os.path.join(copy, "manifest.json"), "w") as f:  # committed, as far as a listing goes
        f.write("{}")
    save_steps(tmp_path / "ckpt", range(1, 6)).close()
    assert step_dirs(memory_dir) == ["step_000000000002", "step_000000000005"], \
        "a restore after the peer's loss needs this node's shards of step 2"


def test_a_node_keeps_the_step_its_agent_pinned_for_promotion(tmp_path, memory_dir):
    with open(os.path.join(memory_dir, PIN_FILE), "w") as f:  # as the agent writes it before asking
        f.write("2")
    save_steps(tmp_path / "ckpt", range(1, 6)).close()
    assert step_dirs(memory_dir) == ["step_000000000002", "step_000000000005"], "the promotion copies step 2"
    assert promote(memory_dir, str(tmp_path / "ckpt"), step=2).step == 2
    gone = promote(memory_dir, str(tmp_path / "ckpt"), step=1)
    assert gone.step is None and gone.reason == "memory step 1 is no longer held (newest: 5)"


@pytest.mark.parametrize("damage", ["flipped byte", "missing shard"])
def test_a_damaged_memory_checkpoint_falls_back_to_durable_naming_the_file(tmp_path, memory_dir, damage):
    save_steps(tmp_path / "ckpt", (1, 2), durable_steps=(1,)).close()
    (shard,) = glob.glob(os.path.join(memory_dir, "step_000000000002", "*.safetensors"))
    if damage == "missing shard":
        os.remove(shard)
    else:
        flip_byte(shard, from_end=8)  # inside the data of "w"
    ckpt = CheckpointManager(tmp_path / "ckpt", memory_tier=True)
    state = {"w": torch.zeros(1000), "n": 0}
    with pytest.warns(RuntimeWarning) as caught:
        assert ckpt.load(state) == 1
    message = str(caught[0].message)
    assert f"step 2 in {memory_dir} (memory tier) cannot be loaded" in message, message
    assert os.path.basename(shard) in message and "falling back to step 1" in message, message
    assert ckpt.restored.tier == "durable" and torch.equal(state["w"], torch.full((1000,), 1.0))


def test_without_an_agent_the_memory_directory_is_private_and_removed_at_close(tmp_path, monkeypatch):
    monkeypatch.delenv(MEMORY_DIR, raising=False)
    ckpt = save_steps(tmp_path / "ckpt", (1,))
    (private,) = [p for p in glob.glob(os.path.join(SHM_ROOT, "elastic-ckpt-*")) if step_dirs(p)]
    assert step_dirs(private) == ["step_000000000001"]
    ckpt.close()
    assert not os.path.exists(private)


def test_save_durable_false_needs_the_memory_tier(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="memory tier only: create the CheckpointManager with memory_tier=True"):
        ckpt.save(1, {"w": torch.zeros(2)}, durable=False)
    with pytest.raises(ValueError, match="replicas=-1 must be an int >= 0"):
        CheckpointManager(tmp_path, memory_tier=True, replicas=-1)


def test_a_state_that_does_not_fit_in_shared_memory_is_refused_with_the_numbers(memory_dir):
    assert room_problem(memory_dir, need=10, free=10) is None
    message = room_problem(memory_dir, need=3 << 30, free=1 << 30)
    assert "needs 3.00 GiB of shared memory" in message and "has 1.00 GiB free" in message
    assert "--shm-size" in message and "memory_tier=False" in message
    tier = MemoryTier(RankGroup.current(), run_id=None, replicas=1)
    tier.check_room(1 << 20)
    assert tier.no_room is None
    tier = MemoryTier(RankGroup.current(), run_id=None, replicas=1)
    share = free_bytes(memory_dir) // 2 + 1  # two copies of it do not fit in what is free now
    with pytest.warns(RuntimeWarning, match=r"needs [\d.]+ GiB of shared memory on this node \(2 copies.*"
                                            r"Memory saves are skipped; durable saves continue"):
        tier.check_room(share)
    assert "has" in tier.no_room and "GiB free" in tier.no_room


def test_a_train_loop_whose_memory_saves_do_not_fit_trains_on_with_durable_saves(tmp_path, monkeypatch):
    """A full /dev/shm cannot be made safely on a shared host: os.statvfs reports the node's
    memory directory full instead (fault injection only; the saves themselves are real)."""
    from test_train_loop import run_with_checkpoints

    node_memory = str(tmp_path / "node-memory")
    monkeypatch.setenv(MEMORY_DIR, node_memory)  # as the agent sets it
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if os.path.realpath(path) != node_memory:
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *st[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, seen = run_with_checkpoints(tmp_path / "ckpt", max_steps=5, memory_save_every=1)
    warned = [str(w.message) for w in caught if "shared memory" in str(w.message)]
    assert len(warned) == 1 and "has 0.00 GiB free" in warned[0] and "durable saves continue" in warned[0], warned
    assert sorted(seen) == [0, 1, 2, 3, 4], "every step trained"
    assert step_dirs(node_memory) == [], "no memory save was written"
    assert CheckpointManager(tmp_path / "ckpt").steps() == [4, 5], "durable saves every 2 steps and at the end"


def test_promote_saves_the_newest_verified_memory_checkpoint_at_breakpoint(tmp_path, memory_dir, capsys):
    durable = tmp_path / "ckpt"
    save_steps(durable, (1, 2, 3), durable_steps=(1,)).close()
    assert promote_main([memory_dir, str(durable)]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["step"] == 3 and outcome["copied_bytes"] > 4000, outcome
    ckpt = CheckpointManager(durable)
    assert ckpt.steps() == [1, 3] and ckpt.verify(3) == 3
    again = promote(memory_dir, str(durable))
    assert again.step is None and "durable step 3 is not older than memory step 3" in again.reason

    # elastic-ckpt inspect shows the tier each save went to (3: into memory, saved at breakpoint).
    assert elastic_ckpt(["inspect", str(durable), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["step"], c["tier"]) for c in listed] == [(1, "durable"), (3, "memory")]
    assert elastic_ckpt(["inspect", str(durable)]) == 0
    table = capsys.readouterr().out
    assert "TIER" in table and re.search(r"\b3\b.*committed\s+memory", table), table

    save_steps(durable, (4,)).close()
    (shard,) = glob.glob(os.path.join(memory_dir, "step_000000000004", "*.safetensors"))
    flip_byte(shard)
    with pytest.raises(CheckpointCorruptError, match=f"{shard}: chunk 'w'"):
        promote(memory_dir, str(durable))
    assert CheckpointManager(durable).steps() == [1, 3], "a corrupt memory checkpoint is never promoted"


def test_one_standby_promotion_process_answers_each_failure(tmp_path, memory_dir):
    from elastic.launcher.promotion_standby import PromotionStandby

    durable = tmp_path / "ckpt"
    save_steps(durable, (1, 2)).close()  # into memory only
    standby = PromotionStandby(memory_dir, str(durable))  # its imports run meanwhile
    try:
        first, pid = standby.promote(2, timeout=120), standby._proc.pid
        again = standby.promote(2, timeout=120)
        assert first["step"] == 2 and first["copied_bytes"] > 4000, first
        assert again["step"] is None and "durable step 2 is not older than memory step 2" in again["reason"]
        assert standby._proc.pid == pid, "the same process, kept for the agent's life"
    finally:
        standby.close()
    assert CheckpointManager(durable).steps() == [2]


def test_two_ranks_share_the_node_memory_and_reshard_from_it(tmp_path, memory_dir, python_env):
    proc = subprocess.run([sys.executable, HERE, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env=dict(python_env, **{MEMORY_DIR: memory_dir}), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("memory-ok") == 2, proc.stdout
    # Saved by 2 ranks, loaded by one process with no process group: resharding from memory.
    ckpt = CheckpointManager(tmp_path / "ckpt", memory_tier=True)
    state = two_tensors(0)
    assert ckpt.load(state) == 3 and ckpt.restored.tier == "memory"
    assert all(torch.equal(state[k], two_tensors(3)[k]) for k in "ab")


def test_a_node_lost_whole_is_restored_from_the_copy_of_its_memory_on_a_survivor(tmp_path, memory_dir, python_env):
    lost = memory_dir + "-lost"  # node 1's memory; this process is node 0 after a shrink
    try:
        proc = subprocess.run([sys.executable, HERE, str(tmp_path / "ckpt"), memory_dir, lost],
                              capture_output=True, text=True, env=python_env, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(os.path.join(memory_dir, REPLICATION_FILE)) as f:
            assert json.load(f) == {"replicas": 2}, "the agent learns `replicas` from the node's leader"
        step, tier, warned = load_warned(tmp_path / "ckpt")
        assert (step, tier) == (2, "durable"), "node 0 alone holds half of step 3"
        assert "not whole in the round" in warned and "held neither on this node" in warned, warned

        copy = os.path.join(memory_dir, REPLICAS_DIR, "node1", "step_000000000003")
        shutil.copytree(os.path.join(lost, "step_000000000003"), copy)  # as the agent pulls it
        shutil.rmtree(lost)  # node 1 lost whole
        ckpt = loads_step_3_from_memory(tmp_path / "ckpt")

        # Saved at breakpoint by the survivor alone: its own shard and the lost node's from the copy.
        promoted = promote(memory_dir, str(tmp_path / "ckpt"))
        assert promoted.step == 3, promoted
        assert CheckpointManager(tmp_path / "ckpt").verify(3) == 3

        (shard,) = glob.glob(os.path.join(copy, "*.safetensors"))
        flip_byte(shard)  # in the copy: every byte is checked
        step, tier, warned = load_warned(tmp_path / "ckpt")
        assert (step, tier) == (3, "durable") and f"{shard}: chunk" in warned and "falling back to step 3" in warned
    finally:
        shutil.rmtree(lost, ignore_errors=True)


def test_a_node_lacking_a_shard_reads_its_chunks_from_the_peer_that_holds_it(tmp_path, memory_dir, python_env):
    from elastic.exchange.memory_layout import PEERS_FILE
    from elastic.launcher.replica_server import ReplicaServer

    peer = memory_dir + "-peer"  # node 1's memory, served by its agent; this process is node 0 of the next round
    try:
        proc = subprocess.run([sys.executable, HERE, str(tmp_path / "ckpt"), memory_dir, peer],
                              capture_output=True, text=True, env=python_env, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        server = ReplicaServer("127.0.0.1", peer, "secret")
        url = f"http://127.0.0.1:{server.port}"
        with open(os.path.join(memory_dir, PEERS_FILE), "w") as f:  # as the agent writes it for the round
            json.dump({"token": "secret", "peers": {"node1": url}}, f)
        (shard,) = glob.glob(os.path.join(peer, "step_000000000003", "*.safetensors"))
        ckpt = loads_step_3_from_memory(tmp_path / "ckpt")
        # Only the chunk this rank needs crossed: node 1's shard minus its safetensors header.
        header = 8 + int.from_bytes(open(shard, "rb").read(8), "little")
        assert ckpt.restored.peer_bytes == os.path.getsize(shard) - header > 0

        flip_byte(shard)  # on the peer: checked as any other read
        step, tier, warned = load_warned(tmp_path / "ckpt")
        name = os.path.basename(shard)
        assert (step, tier) == (2, "durable") and f"{url}/step_000000000003/{name}: chunk" in warned, warned

        server.close()  # the peer is gone: its shard is held nowhere in the round
        step, tier, warned = load_warned(tmp_path / "ckpt")
        assert (step, tier) == (2, "durable") and f"{name} held neither on this node nor by any other" in warned
    finally:
        shutil.rmtree(peer, ignore_errors=True)


def loads_step_3_from_memory(url) -> CheckpointManager:
    """A new manager whose load() took two_tensors' step 3 from memory, with no warning."""
    state = two_tensors(0)
    ckpt = CheckpointManager(url, memory_tier=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.load(state) == 3 and ckpt.restored.tier == "memory"
    assert all(torch.equal(state[k], two_tensors(3)[k]) for k in "ab") and state["n"] == 3
    return ckpt


def flip_byte(path: str, from_end: int = 1) -> None:
    """Flip one bit of the byte `from_end` bytes before the end of `path` (tensor data)."""
    with open(path, "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))


def load_warned(url) -> tuple[int, str, str]:
    """A new manager's load(): the step, the tier, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = CheckpointManager(url, memory_tier=True)
        step = ckpt.load(two_tensors(0))
    return step, ckpt.restored.tier, " ".join(str(w.message) for w in caught)


def two_tensors(step: int) -> dict:
    """Two tensors, so that each of 2 ranks writes one (the writing is split by bytes)."""
    return {"a": torch.arange(1000, dtype=torch.float32) + step, "b": torch.full((1000,), -step), "n": step}


def test_the_agent_skips_the_save_at_breakpoint_without_a_process_when_durable_is_not_older(tmp_path, monkeypatch):
    from elastic.launcher.config import LaunchConfig
    from elastic.launcher.events import EventLog
    from elastic.launcher.memory_dir import MemoryDir, newest_local_durable

    durable, run_id = tmp_path / "ckpt", f"skip-{os.getpid()}"
    config = LaunchConfig(entrypoint=HERE, args=(), run_id=run_id, checkpoint_dir=str(durable))
    node = MemoryDir(config, "node", EventLog(str(tmp_path / "events.jsonl"), run_id=run_id, node_id="node"))
    try:
        monkeypatch.setenv(MEMORY_DIR, node.path)  # as the agent hands it over
        save_steps(durable, (1, 2), durable_steps=(2,)).close()
        assert newest_local_durable(str(durable)) == 2 == newest_local_durable(f"file://{durable}")
        assert newest_local_durable(str(tmp_path / "none")) is None and newest_local_durable("s3://b/p") is None
        node.save_at_breakpoint(0)
        assert node._standby is None, "no promotion process was started or asked"
    finally:
        node.remove()
    (event,) = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert (event["event"], event["seconds"]) == ("memory_checkpoint_not_promoted", 0.0)
    assert event["reason"] == "durable step 2 is not older than memory step 2"


def test_the_agent_queues_a_second_failure_s_promotion_and_waits_for_them_at_exit(tmp_path, monkeypatch):
    from elastic.launcher.config import LaunchConfig
    from elastic.launcher.events import EventLog
    from elastic.launcher.memory_dir import MemoryDir

    durable, run_id = tmp_path / "ckpt", f"queue-{os.getpid()}"
    config = LaunchConfig(entrypoint=HERE, args=(), run_id=run_id, checkpoint_dir=str(durable))
    node = MemoryDir(config, "node", EventLog(str(tmp_path / "events.jsonl"), run_id=run_id, node_id="node"))
    try:
        monkeypatch.setenv(MEMORY_DIR, node.path)
        save_steps(durable, (1, 2)).close()  # into memory only
        node.save_at_breakpoint(0)  # asked, not waited for: the next round would start now
        assert open(os.path.join(node.path, PIN_FILE)).read() == "2"
        node.save_at_breakpoint(1)  # a second failure while it runs: queued behind it
    finally:
        node.remove()  # at exit: both answered first
    events = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert [(e["event"], e["round"]) for e in events] == [
        ("memory_checkpoint_promoted", 0), ("memory_checkpoint_not_promoted", 1)], events
    assert events[1]["reason"] == "durable step 2 is not older than memory step 2"
    assert CheckpointManager(durable).verify(2) == 2


def test_the_memory_directories_of_agents_killed_with_sigkill_are_removed_by_the_next_agent():
    from elastic.launcher.memory_dir import OWNER_FILE, remove_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process: an agent that was killed
    orphan, alive = (tempfile.mkdtemp(prefix="elastic-test-", dir=SHM_ROOT) for _ in range(2))
    for path, pid in ((orphan, gone.pid), (alive, os.getpid())):
        with open(os.path.join(path, OWNER_FILE), "w") as f:
            f.write(str(pid))
    try:
        remove_orphans()
        assert not os.path.exists(orphan) and os.path.isdir(alive)
    finally:
        shutil.rmtree(alive, ignore_errors=True)


# ---------------------------------------------------------------------------- worker side


def _worker(url: str) -> None:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ['CKPT_TEST_STORE']}",
                            rank=int(os.environ["RANK"]), world_size=world)
    ckpt = CheckpointManager(url, memory_tier=True)
    placement = ckpt._memory.placement
    assert (placement.leader, placement.node_ranks, placement.nodes) == (dist.get_rank() == 0, 2, 1), placement
    for step in (1, 2, 3):
        ckpt.save(step, two_tensors(step), durable=step == 2)
    ckpt.wait()
    assert ckpt.steps() == [2]
    manifest = json.load(open(os.path.join(os.environ[MEMORY_DIR], "step_000000000003", "manifest.json")))
    assert manifest["world_size"] == 2 and len(manifest["files"]) == 2, manifest["files"]
    state = two_tensors(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.load(state) == 3 and ckpt.restored.tier == "memory"
    assert all(torch.equal(state[k], two_tensors(3)[k]) for k in "ab") and state["n"] == 3
    ckpt.close()
    dist.destroy_process_group()
    print("memory-ok", flush=True)


def _node_worker(url: str, memory_dirs: list[str]) -> None:
    """Rank r on node r: its own memory directory; steps 1-3 in memory, step 2 also durable."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    os.environ[MEMORY_DIR] = memory_dirs[rank]
    dist.init_process_group("gloo", init_method=f"file://{os.environ['CKPT_TEST_STORE']}", rank=rank, world_size=2)
    ckpt = CheckpointManager(url, memory_tier=True, replicas=2)
    assert ckpt._memory.placement.nodes == 2
    for step in (1, 2, 3):
        ckpt.save(step, two_tensors(step), durable=step == 2)
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    from helpers import fork_ranks

    worker = _worker if len(sys.argv) == 2 else lambda url: _node_worker(url, sys.argv[2:])
    codes = fork_ranks(2, lambda: worker(sys.argv[1]), f"{sys.argv[1]}-store")
    sys.exit(1 if any(codes) else 0)
