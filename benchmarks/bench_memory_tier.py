"""The checkpoint memory tier: how long save() holds training, and how fast a restore reads.

Run:  python benchmarks/bench_memory_tier.py [--mib 256] [--rounds 7]

One process (world size 1), a state of four float32 tensors of --mib MiB in all.
- stall: the time `save(step, state, durable=False)` holds its caller (waiting for nothing
  in flight, then copying the state into the reusable staging buffer; hashing and writing
  into shared memory run in the background), against the same bytes copied with
  `Tensor.copy_` into a buffer allocated once beforehand: the floor any in-memory snapshot
  pays. The background commit is waited for outside the timing. Target: ratio <= 1.2.
- replica: from the commit of a memory checkpoint until a peer's agent holds its copy (its
  puller asks every POLL_EVERY seconds, then copies over HTTP, here on loopback), and the
  copy's own time.
- restore: `load()` of the newest checkpoint from the memory tier, against `load()` of the
  same checkpoint from a directory on local disk with its shard files evicted from the page
  cache first (posix_fadvise DONTNEED), as a restarted node would find them; and `load()` on a
  node whose memory lacks the step (a spare, a node added by growth), reading every chunk from
  a peer's memory over its agent's HTTP server (here on loopback: the cost of the protocol,
  not of a network). All verify every byte they read against its checksum.
Medians over --rounds interleaved rounds, with the figures of every round.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import CheckpointManager  # noqa: E402
from checkpoint.memory_tier import SHM_ROOT  # noqa: E402
from elastic.exchange.env import MEMORY_DIR  # noqa: E402
from elastic.exchange.memory_layout import PEERS_FILE, REPLICATION_FILE  # noqa: E402
from elastic.launcher.replica_pull import Peer, Pulled, ReplicaPuller  # noqa: E402
from elastic.launcher.replica_server import ReplicaServer  # noqa: E402


def make_state(mib: int) -> dict[str, torch.Tensor]:
    per = mib * (1 << 20) // 4 // 4  # four float32 tensors
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.rand(per, generator=gen) for i in range(4)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def evict(root: str) -> None:
    """Drop the shard files under `root` from the page cache (they were fsynced)."""
    for path in glob.glob(os.path.join(root, "step_*", "*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def replica_lag(ckpt: CheckpointManager, state: dict, port: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: seconds from a memory commit until a peer's agent holds the copy, and the
    pull's own seconds (the rest is waiting for its next poll)."""
    peer = tempfile.mkdtemp(prefix="bench-memory-tier-", dir=SHM_ROOT)
    with open(os.path.join(peer, REPLICATION_FILE), "w") as f:
        json.dump({"replicas": 1}, f)  # as the peer's workers tell its agent
    held: queue.Queue[Pulled] = queue.Queue()
    puller = ReplicaPuller(peer, held.put, "token")
    puller.follow([Peer("holder", "127.0.0.1", port)])
    lags, pulls = [], []
    try:
        for step in range(rounds + 1, 2 * rounds + 1):
            ckpt.save(step, state, durable=False)
            ckpt.wait()
            committed = time.perf_counter()
            while (pulled := held.get(timeout=60)).step != step:
                pass
            lags.append(time.perf_counter() - committed)
            pulls.append(pulled.seconds)
    finally:
        puller.close()
        shutil.rmtree(peer, ignore_errors=True)
    return lags, pulls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = make_state(args.mib)
    floor_buffer = torch.empty(sum(t.numel() for t in state.values()), dtype=torch.float32)

    def memcpy() -> None:
        start = 0
        for t in state.values():
            floor_buffer[start:start + t.numel()].copy_(t)
            start += t.numel()

    work = tempfile.mkdtemp(prefix="bench-memory-tier-")  # on local disk
    memory = tempfile.mkdtemp(prefix="bench-memory-tier-", dir=SHM_ROOT)
    empty = tempfile.mkdtemp(prefix="bench-memory-tier-", dir=SHM_ROOT)  # a node added: nothing in memory
    os.environ[MEMORY_DIR] = memory  # as elastic-run's agent hands it to its workers
    server = None
    try:
        ckpt = CheckpointManager(os.path.join(work, "ckpt"), memory_tier=True)
        ckpt.save(0, state, durable=False)  # allocates the staging buffer once, as training would
        ckpt.wait()
        memcpy()
        stalls, floors = [], []
        for step in range(1, args.rounds + 1):
            floors.append(timed(memcpy))
            stalls.append(timed(lambda: ckpt.save(step, state, durable=False)))
            ckpt.wait()
        server = ReplicaServer("127.0.0.1", memory, "token")  # the node holding it, as its agent serves it
        lags, pulls = replica_lag(ckpt, state, server.port, args.rounds)
        ckpt.save(2 * args.rounds + 1, state)  # into memory and to disk: the same step in both tiers
        ckpt.close()

        with open(os.path.join(empty, PEERS_FILE), "w") as f:
            json.dump({"token": "token", "peers": {"holder": f"http://127.0.0.1:{server.port}"}}, f)
        # Only the manifest: in a job the ranks of the nodes holding the step offer it; this
        # one process is the whole world, so its own listing has to show the step.
        step_dir = f"step_{2 * args.rounds + 1:012d}"
        os.makedirs(os.path.join(empty, step_dir))
        shutil.copy(os.path.join(memory, step_dir, "manifest.json"), os.path.join(empty, step_dir))
        target = {k: torch.empty_like(t) for k, t in state.items()}
        from_memory, from_disk, from_peer = [], [], []
        for _ in range(args.rounds):
            restarted = CheckpointManager(os.path.join(work, "ckpt"), memory_tier=True)
            from_memory.append(timed(lambda: restarted.load(target)))
            assert restarted.restored.tier == "memory"
            restarted.close()
            evict(os.path.join(work, "ckpt"))
            disk = CheckpointManager(os.path.join(work, "ckpt"))
            from_disk.append(timed(lambda: disk.load(target)))
            disk.close()
            os.environ[MEMORY_DIR] = empty
            added = CheckpointManager(os.path.join(work, "ckpt"), memory_tier=True)
            from_peer.append(timed(lambda: added.load(target)))
            assert added.restored.tier == "memory" and added.restored.peer_bytes >= args.mib << 20, added.restored
            added.close()
            os.environ[MEMORY_DIR] = memory
        assert all(torch.equal(target[k], state[k]) for k in state)
    finally:
        if server is not None:
            server.close()
        for path in (work, memory, empty):
            shutil.rmtree(path, ignore_errors=True)

    def ms(values: list[float]) -> str:
        return " ".join(f"{v * 1e3:.0f}" for v in values)

    stall, floor = statistics.median(stalls), statistics.median(floors)
    mem, disk, peer = statistics.median(from_memory), statistics.median(from_disk), statistics.median(from_peer)
    gib = args.mib / 1024
    print(f"state: {args.mib} MiB, {args.rounds} rounds (ms per round in brackets)")
    print(f"save(durable=False) stall   {stall * 1e3:8.1f} ms   [{ms(stalls)}]")
    print(f"preallocated memcpy         {floor * 1e3:8.1f} ms   [{ms(floors)}]")
    print(f"  stall / memcpy            {stall / floor:8.2f} x   (target <= 1.2)")
    lag, pull = statistics.median(lags), statistics.median(pulls)
    print(f"commit -> copy held by a peer {lag * 1e3:6.1f} ms   [{ms(lags)}]")
    print(f"  of which the pull itself  {pull * 1e3:8.1f} ms   {gib / pull:6.2f} GiB/s   [{ms(pulls)}]")
    print(f"restore from memory         {mem * 1e3:8.1f} ms   {gib / mem:6.2f} GiB/s   [{ms(from_memory)}]")
    print(f"restore from local disk     {disk * 1e3:8.1f} ms   {gib / disk:6.2f} GiB/s   [{ms(from_disk)}]")
    print(f"restore from a peer's memory {peer * 1e3:7.1f} ms   {gib / peer:6.2f} GiB/s   [{ms(from_peer)}]")
    print(f"  disk / memory             {disk / mem:8.2f} x")
    print(f"  disk / peer's memory      {disk / peer:8.2f} x")


if __name__ == "__main__":
    main()
