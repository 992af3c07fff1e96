"""The manager's API edges and what it must give back: keyword-only options, `process_group=`,
its private gloo group destroyed on close() and regroup(), the round fence's etcd client
closed, export's shard descriptors closed.

Real gloo groups in real processes: the test runs this file as a script that forks the
ranks (as torchrun would start them), meeting through a FileStore in the test's directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch
from helpers import wait_until

from checkpoint import CheckpointManager

HERE = os.path.abspath(__file__)


def test_options_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        CheckpointManager(tmp_path, 3)  # once silently keep_best=3


@pytest.mark.parametrize("mode, world", [("groups", 2), ("subgroups", 4)])
def test_private_group_and_process_group(tmp_path, python_env, mode, world):
    proc = subprocess.run([sys.executable, HERE, mode, str(world), str(tmp_path)], env=python_env, check=False,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("rank-ok") == world, proc.stdout


def _fd_targets() -> list[str]:
    """What this process's open descriptors point at (from /proc)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return targets


def _etcd_connections(port: int) -> int:
    """Established TCP connections of this process to `port` (from /proc)."""
    inodes = {t[8:-1] for t in _fd_targets() if t.startswith("socket:[")}
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
                count += remote_port == port and state == "01" and inode in inodes
    return count


def test_manager_closes_the_round_fences_it_held(tmp_path, etcd_server, run_id):
    from elastic.rendezvous.etcd_client import EtcdConfig
    from elastic.worker.fencing import RoundFence

    def fence() -> RoundFence:
        made = RoundFence(EtcdConfig(etcd_server.endpoint), "elastic", run_id, 0)
        assert made.newest_sealed_round() is None  # opens its client
        return made

    before = _etcd_connections(etcd_server.port)
    ckpt = CheckpointManager(tmp_path, commit_guard=fence())
    for _ in range(3):  # as a TrainLoop does after each in-process reconfiguration
        ckpt.set_commit_guard(fence())
    ckpt.close()
    wait_until("the fences' etcd connections closed", lambda: _etcd_connections(etcd_server.port) <= before,
               timeout=10)
    with fence() as alone:
        assert _etcd_connections(etcd_server.port) > before
    assert alone.newest_sealed_round() is None  # usable again after close(): opens another
    alone.close()


def test_export_closes_its_shard_files(tmp_path):
    from checkpoint.cli.catalog import open_root
    from checkpoint.cli.export import export

    url = str(tmp_path / "ckpt")
    with CheckpointManager(url) as ckpt:
        ckpt.save(1, {"w": torch.arange(12.0), "b": torch.ones(2)})

    assert export(open_root(url), 1, str(tmp_path / "full.safetensors"), overwrite=False)[0] == 2
    assert [t for t in _fd_targets() if t.startswith(url)] == []


# ---------------------------------------------------------------------------- worker side


def _alive(group) -> bool:
    import torch.distributed as dist

    try:
        dist.get_process_group_ranks(group)
    except KeyError:  # unknown to torch.distributed: destroyed
        return False
    return True


def _worker(mode: str, root: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ['CKPT_TEST_STORE']}", rank=rank, world_size=world)
    if mode == "groups":
        ckpt = CheckpointManager(f"{root}/ckpt")
        first = ckpt._ranks.group
        ckpt.regroup()
        assert not _alive(first) and _alive(ckpt._ranks.group), "regroup() must destroy the group it replaces"
        second = ckpt._ranks.group
        ckpt.save(1, {"w": torch.full((4,), float(rank))})
        ckpt.close()
        assert not _alive(second), "close() must destroy the private group"
    else:
        # Two disjoint halves, each with a manager of its own on its own directory.
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        half = rank // 2
        with CheckpointManager(f"{root}/half{half}", keep_last=1, process_group=halves[half]) as ckpt:
            ckpt.save(1, {"w": torch.full((4,), float(half)), "n": half})
            ckpt.wait()
            if rank % 2 == 0:
                assert ckpt.manifest(1).world_size == 2, ckpt.manifest(1)
            state = {"w": torch.zeros(4), "n": None}
            assert ckpt.load(state) == 1 and state["n"] == half and torch.equal(state["w"], torch.full((4,), float(half)))
        dist.barrier()
    dist.destroy_process_group()
    print("rank-ok", flush=True)


if __name__ == "__main__":
    from helpers import fork_ranks

    mode, world, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    codes = fork_ranks(world, lambda: _worker(mode, root), f"{root}/store-{uuid.uuid4().hex[:8]}")
    sys.exit(1 if any(codes) else 0)
