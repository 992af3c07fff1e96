"""Rendezvous at scale: our etcd v3 rendezvous vs torch.distributed.elastic's c10d rendezvous.

    python benchmarks/bench_rendezvous.py --agents 8,64,256,1024 --trials 20
    python benchmarks/bench_rendezvous.py --quick            # ~1 minute: 8,64 agents, 3 trials

Simulated agents are real `EtcdBackend` + `EtcdRendezvous` objects, each with its own lease,
keep-alive thread, watch and mirror, run as threads spread over a few worker processes
(spawned, one pipe each); the agents of one process share its etcd client (one gRPC
channel), as agents on one host could; the coordinator (this process) starts
one private etcd, tells the workers what to do and reads etcd itself to see registrations.
Times are `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process on the machine).

Every trial is a fresh run id, so every trial starts at round 0 with fresh leases:

  join     MIN=MAX=N. N-1 agents join and register; then the last one calls join().
           Measured: from that call to the moment the last of the N agents holds the sealed
           round (its join() returned).
  join*    the same with MIN=N-1, MAX=N (MIN reached before the last join: the last-call
           window is running, and reaching MAX must cut it short).
  death    MIN=N-1, MAX=N, after join*: one member dies. Measured: from its death to the
           moment the last survivor holds the next sealed round. "revoke": its lease is
           revoked (a death detected at once); "ttl": its keep-alive stops and the lease
           expires (lease TTL 2 s, the least the runtime accepts), at small N only.
           The survivors run the agent's watch rules (elastic/launcher/round_watch.py): they see
           the member's `alive` key vanish by watch and bump the round themselves.
  churn    MIN=N/2, MAX=N, last call 0.5 s: while the round forms, 10% of the agents die and
           10% more arrive. A record sealed just before a death names the dead agent; the
           survivors then bump the round as on any death. Measured: from the start to the
           moment every agent named in the first record of live agents only holds it.
           Checked: that record was created once, every agent named in it holds it, and
           the holders of each round agree on its member list and their own ranks.

c10d: `DynamicRendezvousHandler` over `C10dRendezvousBackend` on one TCPStore (in this
process), one TCPStore client per agent, timeouts tuned (--c10d-last-call 0.5 s, keep-alive
--c10d-keepalive 1 s x --c10d-attempts 3) rather than the defaults (30 s last call, 5 s x 3).
Its join loop polls the store once a second, so a keep-alive expiry much under 3 s drops
live nodes that are still waiting in the loop (seen here with 0.5 s x 2). Its
agents learn nothing by watch: a real torchrun agent finds a dead peer only when its workers
fail. The benchmark gives c10d the best case, an instant detection: every survivor calls
next_rendezvous() right at the death. Writes are its `set_state` calls (each rewrites the
whole state blob); retries are the ones whose compare-and-set failed.

Writes are requests that change etcd (transactions, puts, lease grants; EtcdBackend.writes)
per agent per round, counted from the start of the round's formation until every agent
holds it; retries are transactions whose compare failed (EtcdBackend.failed_txns).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import pickle
import random
import signal
import statistics
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _common import pct, wait_until  # noqa: E402

os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # no per-round store server

C10D_NULL_SENTINEL = b"Y2FuaW1hZGFt"  # C10dRendezvousBackend's "no state yet"
WAIT_TIMEOUT = 90.0  # one phase of one trial; beyond it the trial counts as failed
SETUP_TIMEOUT = 600.0  # N-1 agents registering and their mirrors catching up (1,024 on a busy box)
POLL = 0.005  # seconds between looks at etcd while the coordinator waits


@dataclass(frozen=True)
class RunParams:
    """One run of the rendezvous (a fresh run id): what every simulated agent is told."""

    impl: str  # "etcd" or "c10d"
    run_id: str
    min_nodes: int
    max_nodes: int
    last_call: float
    lease_ttl: float = 60.0  # etcd lease TTL: long, so that setting up 1,024 agents cannot expire one
    keepalive: float = 1.0  # c10d keep-alive interval
    keepalive_attempts: int = 3  # c10d: a node is dead after interval x attempts without a heartbeat


# == worker processes: the simulated agents ===================================================


class AgentDied(Exception):
    """Raised inside a simulated agent's join() once the benchmark killed it."""


def _raise_if(dead: threading.Event, node: str) -> None:
    if dead.is_set():
        raise AgentDied(node)


class _SharedClient:
    """The worker process's one etcd client (one gRPC channel, one watch stream), shared by
    its agents and kept across trials: EtcdBackend.shutdown() closes its client, not ours.

    Each agent still has its own lease, keep-alive thread, watch and mirror, and runs the
    real EtcdRendezvous code for join and seal; only the connection is shared, as the
    agents of one host could share it. Hundreds of channels in one process starve each
    other (and their keep-alives) on two cores.
    """

    def __init__(self, endpoint: str) -> None:
        from elastic.rendezvous.etcd_client import EtcdConfig, connect

        # A long request timeout: hundreds of agents on two cores can take seconds to get a
        # watch created; the default 5 s makes setup fail rather than measure anything.
        self._client = connect(EtcdConfig(endpoint, timeout=30.0), check=False)

    def __getattr__(self, name):
        return getattr(self._client, name)

    def close(self) -> None:
        pass


class EtcdAgent:
    """One simulated agent: EtcdBackend + EtcdRendezvous, and the agent's watch rules."""

    def __init__(self, idx: int, endpoint: str, client: _SharedClient) -> None:
        self.idx = idx
        self.node = f"n{idx:05d}"
        self.client = client
        self.endpoint = endpoint
        self.dead = threading.Event()
        self.joins: list[tuple] = []
        self.rdzv = self.backend = None

    def setup(self, params: RunParams) -> None:
        from elastic.rendezvous.etcd_client import TRANSIENT_ERRORS
        from elastic.launcher.config import LaunchConfig
        from elastic.rendezvous.settings import RendezvousSettings
        from elastic.rendezvous.etcd_state import EtcdBackend
        from elastic.rendezvous.handler import EtcdRendezvous

        settings = RendezvousSettings(join_timeout=SETUP_TIMEOUT + WAIT_TIMEOUT, last_call_timeout=params.last_call,
                                      lease_ttl=params.lease_ttl, key_prefix="bench", cooldown_base=0.001)
        config = LaunchConfig(entrypoint=__file__, args=(), min_nodes=params.min_nodes,
                              max_nodes=params.max_nodes, rdzv_endpoint=self.endpoint,
                              run_id=params.run_id, node_id=self.node, rdzv=settings)
        # A fresh event and list per trial: a thread left from the last trial sees only its own.
        self.dead = dead = threading.Event()
        self.joins = []
        self.backend = EtcdBackend(self.client, "bench", params.run_id, self.node)
        self.rdzv = EtcdRendezvous(self.backend, config, "127.0.0.1", lambda: 10000 + self.idx)
        self.rdzv.should_abort = lambda: _raise_if(dead, self.node)
        for attempt in range(3):  # on a busy machine, creating hundreds of watches can time out
            try:
                self.rdzv.start()
                return
            except TRANSIENT_ERRORS:
                if attempt == 2:
                    raise

    def counters(self) -> tuple[int, int]:
        return self.backend.writes, self.backend.failed_txns

    def run(self, record) -> None:
        """join -> hold the round -> on a change (round moved, member gone) join again."""
        rdzv, dead, joins = self.rdzv, self.dead, self.joins
        while not dead.is_set():
            assignment = rdzv.join()
            members = rdzv.sealed_members(assignment.round)
            record(joins, (time.monotonic(), assignment.round, members, assignment.group_rank,
                           assignment.world_size))
            while not dead.is_set():  # as elastic/launcher/round_watch.py check_round
                if rdzv.closed() is not None:
                    return
                if rdzv.current_round() != assignment.round:
                    break
                gone = rdzv.departed_members(assignment.round, members)
                if gone:
                    rdzv.bump_round(assignment.round, reason=f"node {gone[0]} is gone", failed_node=gone[0])
                    break
                rdzv.wait_for_change(1.0)

    def kill(self, mode: str) -> None:
        self.dead.set()  # first: the dead agent must not see its own key vanish and react
        if mode == "revoke":
            self.backend.revoke_lease()
        else:  # "ttl": stop keeping the lease alive; etcd expires it
            self.rdzv._stop.set()  # noqa: SLF001  (the keep-alive thread's stop flag; a bench-only death)
        self.rdzv.wake()

    def rejoin(self) -> None:
        pass  # our agents learn of a death by watch

    def teardown(self) -> None:
        import grpc

        self.dead.set()
        rdzv, self.rdzv = self.rdzv, None
        if rdzv is not None:
            rdzv.wake()
            try:
                rdzv.shutdown()  # cancels the watch, revokes the lease; the shared client stays
            except grpc.RpcError:
                pass  # the lease of a killed agent is already revoked or expired

    def close(self) -> None:
        pass  # the process's client is closed when the process exits


class C10dAgent:
    """One simulated torchelastic agent: DynamicRendezvousHandler over C10dRendezvousBackend."""

    def __init__(self, idx: int, endpoint: str) -> None:
        from torch.distributed import TCPStore

        host, _, port = endpoint.rpartition(":")
        self.idx = idx
        self.node = f"n{idx:05d}"
        self.store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
        self.dead = threading.Event()
        self.go = threading.Event()
        self.joins: list[tuple] = []
        self.handler = self.backend = None

    def setup(self, params: RunParams) -> None:
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
            DynamicRendezvousHandler,
            RendezvousTimeout,
        )

        class Counting(C10dRendezvousBackend):
            writes = 0
            failed = 0

            def set_state(self, state, token=None):
                result = super().set_state(state, token)
                self.writes += 1
                self.failed += 0 if result is not None and result[2] else 1
                return result

        self.dead, self.go, self.joins = threading.Event(), threading.Event(), []
        self.backend = Counting(self.store, params.run_id)
        timeout = RendezvousTimeout(join=timedelta(seconds=WAIT_TIMEOUT),
                                    last_call=timedelta(seconds=params.last_call),
                                    close=timedelta(seconds=5), heartbeat=timedelta(seconds=5))
        self.handler = DynamicRendezvousHandler.from_backend(
            params.run_id, self.store, self.backend, params.min_nodes, params.max_nodes,
            local_addr=self.node, timeout=timeout, keep_alive_interval=params.keepalive,
            keep_alive_max_attempt=params.keepalive_attempts)

    def counters(self) -> tuple[int, int]:
        return self.backend.writes, self.backend.failed

    def run(self, record) -> None:
        """next_rendezvous -> hold the round until told that the workers failed -> again."""
        handler, dead, go, joins = self.handler, self.dead, self.go, self.joins
        while not dead.is_set():
            info = handler.next_rendezvous()
            state = handler._state_holder.state  # noqa: SLF001  (to check every agent's view)
            ranked = sorted(state.participants.items(), key=lambda item: item[1])
            members = tuple(node.addr for node, _ in ranked)
            record(joins, (time.monotonic(), state.round, members, info.rank, info.world_size))
            go.wait()
            go.clear()

    def kill(self, mode: str) -> None:
        self.dead.set()
        self.handler._stop_heartbeats()  # noqa: SLF001  (a dead agent stops heart-beating)
        self.go.set()

    def rejoin(self) -> None:
        self.go.set()  # the survivors' workers failed: call next_rendezvous() again

    def teardown(self) -> None:
        self.dead.set()
        self.go.set()
        if self.handler is not None:
            self.handler._stop_heartbeats()  # noqa: SLF001  (shutdown() would close the run)

    def close(self) -> None:
        pass


def worker_main(conn, impl: str, endpoint: str) -> None:
    """Serve the coordinator's commands over `conn` until "exit" (or the pipe closes)."""
    import os

    from elastic.host.process import die_with_parent

    die_with_parent(os.getppid())
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    if impl == "etcd":
        client = _SharedClient(endpoint)
        kind = lambda idx, endpoint: EtcdAgent(idx, endpoint, client)  # noqa: E731
    else:
        kind = C10dAgent
    agents: dict[int, object] = {}
    changed = threading.Condition()
    errors: list[str] = []
    pool = ThreadPoolExecutor(max_workers=16)

    def record(joins: list, result: tuple) -> None:
        with changed:
            joins.append(result)
            changed.notify_all()

    def body(agent) -> None:
        dead = agent.dead
        try:
            agent.run(record)
        except AgentDied:
            pass
        except Exception:  # noqa: BLE001  (reported to the coordinator, which fails the trial)
            if not dead.is_set():
                with changed:
                    errors.append(f"{agent.node}: {traceback.format_exc()}")
                    changed.notify_all()

    def handle(cmd: str, kw: dict):
        if cmd in ("connect", "setup"):
            for idx in kw["idxs"]:
                if idx not in agents:
                    agents[idx] = None
            missing = [i for i, a in agents.items() if a is None]
            for idx, agent in zip(missing, pool.map(lambda i: kind(i, endpoint), missing)):
                agents[idx] = agent
            if cmd == "connect":
                return {}
            errors.clear()
            list(pool.map(lambda i: agents[i].setup(kw["params"]), kw["idxs"]))
            return {}
        if cmd == "start":
            t0 = time.monotonic()
            for idx in kw["idxs"]:
                threading.Thread(target=body, args=(agents[idx],), daemon=True).start()
            return {"t0": t0}
        if cmd == "wait":  # until each agent held its nth round, or round number `round`
            deadline = time.monotonic() + kw["timeout"]
            want = [agents[i] for i in kw["idxs"]]

            def held(agent):
                if kw.get("round") is not None:
                    return next((j for j in agent.joins if j[1] == kw["round"]), None)
                return agent.joins[kw["nth"] - 1] if len(agent.joins) >= kw["nth"] else None

            pending = list(want)

            def all_held() -> bool:  # called on each agent's join: O(1) each, not O(agents)
                while pending and held(pending[-1]) is not None:
                    pending.pop()
                return not pending

            with changed:
                changed.wait_for(lambda: errors or all_held(), timeout=max(0.0, deadline - time.monotonic()))
                return {"results": {a.idx: held(a) for a in want if held(a) is not None}, "errors": list(errors)}
        if cmd == "mirrored":  # until each agent's own mirror shows `count` members of `round`
            deadline = time.monotonic() + kw["timeout"]
            for idx in kw["idxs"]:
                backend = agents[idx].backend
                while len(backend.state().members) < kw["count"] or backend.current_round() != kw["round"]:
                    if not backend.wait(backend.version, deadline - time.monotonic()):
                        return {"ok": False}
            return {"ok": True}
        if cmd == "joins":
            return {"joins": {a.idx: list(a.joins) for a in agents.values() if a is not None and a.joins}}
        if cmd == "kill":
            t0 = time.monotonic()
            for idx in kw["idxs"]:
                agents[idx].kill(kw["mode"])
            return {"t0": t0}
        if cmd == "rejoin":
            for idx in kw["idxs"]:
                agents[idx].rejoin()
            return {}
        if cmd == "counters":
            return {"counters": {i: agents[i].counters() for i in kw["idxs"]}}
        if cmd == "teardown":
            list(pool.map(lambda a: a.teardown(), [a for a in agents.values() if a is not None]))
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    try:
        while True:
            try:
                cmd, kw = conn.recv()
            except EOFError:
                return
            if cmd == "exit":
                break
            try:
                conn.send(("ok", handle(cmd, kw)))
            except Exception:  # noqa: BLE001  (sent back; the coordinator raises it)
                conn.send(("error", traceback.format_exc()))
    finally:
        for agent in agents.values():
            if agent is not None:
                agent.teardown()
                agent.close()
        conn.close()
        os._exit(0)  # gRPC and TCPStore threads must not hold the process up


# == coordinator ==============================================================================


class TrialFailed(Exception):
    pass


class OutOfTime(RuntimeError):
    """One N used up its --n-cap seconds; its workers are killed and the next N runs."""


class Workers:
    """A few worker processes holding the simulated agents; agent i lives in worker i % n."""

    def __init__(self, impl: str, endpoint: str, count: int, deadline: float) -> None:
        ctx = mp.get_context("spawn")
        self.deadline = deadline  # time.monotonic() after which every call fails (caps one N)
        self.conns, self.procs = [], []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, impl, endpoint), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def _split(self, idxs) -> dict[int, list[int]]:
        parts: dict[int, list[int]] = {}
        for idx in idxs:
            parts.setdefault(idx % len(self.conns), []).append(idx)
        return parts

    def call(self, cmd: str, idxs=None, **kw) -> list[dict]:
        """Send `cmd` to the workers holding `idxs` (all workers if None) and gather replies."""
        targets = {w: None for w in range(len(self.conns))} if idxs is None else self._split(idxs)
        for w, part in targets.items():
            self.conns[w].send((cmd, dict(kw, idxs=part) if part is not None else kw))
        replies = []
        for w in targets:
            if not self.conns[w].poll(max(0.0, self.deadline - time.monotonic())):
                raise OutOfTime(f"{cmd} did not finish within the cap for this N (--n-cap)")
            status, reply = self.conns[w].recv()
            if status != "ok":
                raise RuntimeError(f"worker {w} failed on {cmd}:\n{reply}")
            replies.append(reply)
        return replies

    def wait(self, idxs, nth: int = 1, timeout: float = WAIT_TIMEOUT, round_: int | None = None) -> dict[int, tuple]:
        """Each agent's nth held round (or the round numbered `round_`), once all hold it."""
        results: dict[int, tuple] = {}
        errors: list[str] = []
        for reply in self.call("wait", idxs, nth=nth, timeout=timeout, round=round_):
            results.update(reply["results"])
            errors += reply["errors"]
        if errors:
            raise TrialFailed("agent error: " + errors[0])
        missing = sorted(set(idxs) - set(results))
        if missing:
            which = f"round {round_}" if round_ is not None else f"their round #{nth}"
            raise TrialFailed(f"{len(missing)} agents did not hold {which} within {timeout:g}s "
                              f"(first: n{missing[0]:05d})")
        return results

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the worker processes have used so far (Linux /proc)."""
        total = 0
        for proc in self.procs:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return total / os.sysconf("SC_CLK_TCK")

    def counters(self, idxs) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for reply in self.call("counters", idxs):
            out.update(reply["counters"])
        return out

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit", {}))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join()


class EtcdObserver:
    """The coordinator's own view of a run's keys in etcd."""

    def __init__(self, endpoint: str) -> None:
        from elastic.rendezvous.etcd_client import EtcdConfig, connect

        self.client = connect(EtcdConfig(endpoint))

    def registered(self, run_id: str, round_: int) -> int:
        prefix = f"/bench/{run_id}/rounds/{round_}/members/"
        return self.client.get_prefix_response(prefix, count_only=True).count

    def current_round(self, run_id: str) -> int:
        raw, _meta = self.client.get(f"/bench/{run_id}/round")
        return int(raw) if raw is not None else 0

    def sealed(self, run_id: str, round_: int):
        """(node ids, version of the key) of round_'s sealed record, or None."""
        from elastic.rendezvous.protocol import SealedRound

        raw, meta = self.client.get(f"/bench/{run_id}/rounds/{round_}/sealed")
        return None if raw is None else (SealedRound.from_json(raw).node_ids, meta.version)

    def close(self) -> None:
        self.client.close()


class C10dObserver:
    """Reads the c10d rendezvous state blob from the TCPStore."""

    def __init__(self, store) -> None:
        self.store = store

    def registered(self, run_id: str, round_: int) -> int:
        key = "torch.rendezvous." + run_id
        if not self.store.check([key]):
            return 0
        blob = self.store.get(key)
        if blob == C10D_NULL_SENTINEL:
            return 0
        raw = base64.b64decode(blob)
        try:
            state = pickle.loads(raw)  # noqa: S301  (torch's own format, written by torch)
        except (pickle.UnpicklingError, EOFError):
            return 0
        return len(state.participants) if state.round == round_ else 0

    def close(self) -> None:
        pass


def check_agreement(results: dict[int, tuple], expected_size: int | None) -> str | None:
    """Every agent holds the same ordered members and its rank is its place in it."""
    views = {r[2] for r in results.values()}
    if len(views) != 1:
        return f"{len(views)} different member lists for one round"
    (members,) = views
    if len({r[1] for r in results.values()}) != 1:
        return "agents hold different rounds"
    for idx, (_t, _round, _members, rank, world) in results.items():
        if members[rank] != f"n{idx:05d}" or world != len(members):
            return f"n{idx:05d} holds rank {rank} of {world} in {members[:4]}..."
    if expected_size is not None and len(members) != expected_size:
        return f"sealed {len(members)} members, expected {expected_size}"
    return None


def per_agent(before: dict, after: dict, idxs) -> tuple[float, float]:
    writes = sum(after[i][0] - before[i][0] for i in idxs)
    failed = sum(after[i][1] - before[i][1] for i in idxs)
    return writes / len(idxs), failed / len(idxs)


@dataclass
class Series:
    """Samples of one metric for one (impl, N)."""

    times: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # churn: rounds until one held by live agents only
    first: list[float] = field(default_factory=list)  # join: seconds until the first agent held the round
    cpu: list[float] = field(default_factory=list)  # join, death: CPU seconds the simulated agents used meanwhile
    trials: int = 0
    note: str = ""

    def add(self, seconds: float, writes: float, retries: float) -> None:
        self.times.append(seconds)
        self.writes.append(writes)
        self.retries.append(retries)


class Bench:
    def __init__(self, args, impl: str, endpoint: str, observer, n: int, procs: int) -> None:
        self.args, self.impl, self.n, self.observer = args, impl, n, observer
        extra = max(1, round(0.1 * n))  # churn arrivals
        self.pool = n + extra if impl == "etcd" else n
        self.workers = Workers(impl, endpoint, procs, time.monotonic() + args.n_cap)
        self.rng = random.Random(n)
        self.out_of_time = False
        self.workers.call("connect", range(self.pool))  # processes and clients, before any timing

    def close(self) -> None:
        self.workers.close()

    def params(self, **kw) -> RunParams:
        run_id = f"{self.impl}-{self.n}-{uuid.uuid4().hex[:8]}"
        return RunParams(impl=self.impl, run_id=run_id, **kw)

    def _setup(self, params: RunParams, idxs) -> dict:
        self.workers.call("setup", idxs, params=params)
        return self.workers.counters(idxs)

    def join_trial(self, params: RunParams, out: Series) -> bool:
        """N-1 agents register, then the last joins: time until all N hold the sealed round."""
        n = self.n
        idxs = list(range(n))
        before = self._setup(params, idxs)
        self.workers.call("start", idxs[:-1])
        wait_until(f"{n - 1} registrations", lambda: self.observer.registered(params.run_id, 0) >= n - 1,
                   SETUP_TIMEOUT, poll=POLL, error=TrialFailed)
        if self.impl == "etcd":
            # The last node arrives once the others are waiting, their watches caught up: the
            # N^2 registration events of starting N-1 agents at once are setup, not the join.
            replies = self.workers.call("mirrored", idxs[:-1], count=n - 1, round=0, timeout=SETUP_TIMEOUT)
            if not all(r["ok"] for r in replies):
                raise TrialFailed(f"agents' mirrors did not show {n - 1} registrations within {SETUP_TIMEOUT:g}s")
        cpu = self.workers.cpu_seconds()
        (reply,) = self.workers.call("start", [n - 1])
        results = self.workers.wait(idxs, nth=1)
        cpu = self.workers.cpu_seconds() - cpu
        bad = check_agreement(results, n)
        if bad:
            raise TrialFailed(bad)
        after = self.workers.counters(idxs)
        out.add(max(r[0] for r in results.values()) - reply["t0"], *per_agent(before, after, idxs))
        out.first.append(min(r[0] for r in results.values()) - reply["t0"])
        out.cpu.append(cpu)
        return True

    def formed_round(self, params: RunParams) -> list[int]:
        """c10d: all N start at once (its last call is short); wait until all hold round 0."""
        idxs = list(range(self.n))
        self._setup(params, idxs)
        self.workers.call("start", idxs)
        bad = check_agreement(self.workers.wait(idxs, nth=1), self.n)
        if bad:
            raise TrialFailed(bad)
        return idxs

    def death_trial(self, params: RunParams, mode: str, out: Series) -> None:
        """One member dies: time until every survivor holds the next sealed round."""
        idxs = list(range(self.n))
        victim = self.rng.choice(idxs)
        survivors = [i for i in idxs if i != victim]
        before = self.workers.counters(survivors)
        cpu = self.workers.cpu_seconds()
        (reply,) = self.workers.call("kill", [victim], mode=mode)
        if self.impl == "c10d":
            self.workers.call("rejoin", survivors)  # best case: its agents detect the death at once
        results = self.workers.wait(survivors, nth=2)
        out.cpu.append(self.workers.cpu_seconds() - cpu)
        bad = check_agreement(results, self.n - 1)
        if bad:
            raise TrialFailed(bad)
        after = self.workers.counters(survivors)
        out.add(max(r[0] for r in results.values()) - reply["t0"], *per_agent(before, after, survivors))

    def churn_trial(self, out: Series) -> None:
        """10% leave and 10% arrive while the round forms; check one record per round and agreement.

        A leaver may already be in the first sealed record (it died after the sealer read its
        registration): the survivors then bump the round, as on any death, and the trial
        waits for the round whose record names only live agents.
        """
        n = self.n
        extra = self.pool - n
        params = self.params(min_nodes=max(1, n // 2), max_nodes=n, last_call=0.5)
        idxs = list(range(self.pool))
        self._setup(params, idxs)
        started = time.monotonic()
        self.workers.call("start", idxs[:n])
        wait_until(f"{n // 2} registrations", lambda: self.observer.registered(params.run_id, 0) >= n // 2,
                   WAIT_TIMEOUT, poll=POLL, error=TrialFailed)
        leaving = self.rng.sample(range(n), extra)
        dead = {f"n{i:05d}" for i in leaving}
        self.workers.call("kill", leaving, mode="revoke")
        self.workers.call("start", idxs[n:])

        def settled():
            round_ = self.observer.current_round(params.run_id)
            record = self.observer.sealed(params.run_id, round_)
            return (round_, record) if record is not None and not dead & set(record[0]) else None

        final, (members, version) = wait_until("a sealed round of live agents", settled, WAIT_TIMEOUT,
                                               poll=POLL, error=TrialFailed)
        if version != 1:
            raise TrialFailed(f"round {final}'s sealed record was written {version} times")
        held = [i for i in idxs if f"n{i:05d}" in members]
        results = self.workers.wait(held, round_=final)
        joins: dict[int, list] = {}
        for reply in self.workers.call("joins"):
            joins.update(reply["joins"])
        for round_ in range(final + 1):
            holders = {i: j for i, js in joins.items() for j in js if j[1] == round_}
            bad = check_agreement(holders, None) if holders else None
            if bad:
                raise TrialFailed(f"round {round_}: {bad}")
        if next(iter(results.values()))[2] != members:
            raise TrialFailed("agents hold a member list that differs from etcd's sealed record")
        out.add(max(r[0] for r in results.values()) - started, 0.0, 0.0)
        out.rounds.append(final + 1)
        out.note = (f"sealed {len(members)}/{n}; {extra} left, {extra} arrived; "
                    f"rounds to settle: max {max(out.rounds)}")

    def run_series(self, name: str, trials: int, budget: float, one_trial) -> Series:
        """Run up to `trials` trials (fewer if `budget` seconds run out); a failure is recorded."""
        out = Series()
        if self.out_of_time:
            out.note = "not run: --n-cap reached"
            return out
        start = time.monotonic()
        for _ in range(trials):
            if out.trials and time.monotonic() - start > budget:
                out.note = (out.note + "; " if out.note else "") + f"time budget {budget:g}s reached"
                break
            out.trials += 1
            try:
                one_trial(out)
            except TrialFailed as exc:
                out.failures.append(str(exc))
                print(f"  {self.impl} N={self.n} {name}: trial failed: {exc}", flush=True)
                if len(out.failures) >= 2:
                    break
            except OutOfTime:
                out.trials -= 1  # the unfinished trial does not count
                out.note = (out.note + "; " if out.note else "") + f"cut by --n-cap {self.args.n_cap:g}s"
                print(f"  {self.impl} N={self.n} {name}: --n-cap reached", flush=True)
                self.out_of_time = True
                break
            finally:
                if not self.out_of_time:
                    self.workers.call("teardown")
        return out


def bench_etcd(args, endpoint: str, observer, n: int) -> dict[str, Series]:
    bench = Bench(args, "etcd", endpoint, observer, n, procs_for(args, n))
    results: dict[str, Series] = {}
    trials = args.trials if n < 1024 else args.trials_1024
    budget = args.budget
    wanted = args.series
    try:
        if "join" in wanted:
            results["join"] = bench.run_series("join", trials, budget, lambda out: bench.join_trial(
                bench.params(min_nodes=n, max_nodes=n, last_call=30.0), out))
        both = (Series(), Series())

        def join_then_death(_out) -> None:
            params = bench.params(min_nodes=n - 1, max_nodes=n, last_call=30.0)
            bench.join_trial(params, both[0])
            bench.death_trial(params, "revoke", both[1])

        if n >= 2 and {"join*", "death"} & wanted:
            shared = bench.run_series("join*+death", trials, budget, join_then_death)
            for s in both:
                s.trials, s.failures, s.note = shared.trials, shared.failures, shared.note
            results["join*"], results["death"] = both
        if n <= args.ttl_max_agents and args.ttl_trials and "death-ttl" in wanted:
            def ttl_death(out) -> None:
                params = bench.params(min_nodes=n - 1, max_nodes=n, last_call=30.0, lease_ttl=2.0)
                bench.join_trial(params, Series())
                bench.death_trial(params, "ttl", out)

            results["death-ttl"] = bench.run_series("death-ttl", args.ttl_trials, budget, ttl_death)
        churn_trials = trials if n < 1024 else min(trials, args.trials_1024)
        if "churn" in wanted:
            results["churn"] = bench.run_series("churn", churn_trials, budget, bench.churn_trial)
    finally:
        bench.close()
    return results


def bench_c10d(args, endpoint: str, observer, n: int) -> dict[str, Series]:
    bench = Bench(args, "c10d", endpoint, observer, n, procs_for(args, n))
    results: dict[str, Series] = {}
    try:
        results["join"] = bench.run_series("join", args.c10d_trials, args.budget, lambda out: bench.join_trial(
            bench.params(min_nodes=n, max_nodes=n, last_call=args.c10d_last_call,
                         keepalive=args.c10d_keepalive,
                                  keepalive_attempts=args.c10d_attempts), out))

        def death(out) -> None:
            params = bench.params(min_nodes=n - 1, max_nodes=n, last_call=args.c10d_last_call,
                                  keepalive=args.c10d_keepalive,
                                  keepalive_attempts=args.c10d_attempts)
            bench.formed_round(params)
            bench.death_trial(params, "revoke", out)

        results["death"] = bench.run_series("death", args.c10d_trials, args.budget, death)
    finally:
        bench.close()
    return results


def procs_for(args, n: int) -> int:
    return args.procs or max(1, min(4, n // 64))


# == report ===================================================================================


METRICS = [
    ("join", "last join -> all hold sealed round (MIN=MAX=N)"),
    ("join*", "last join -> all hold sealed round (MIN=N-1, MAX=N)"),
    ("death", "death (lease revoked) -> survivors hold next round"),
    ("death-ttl", "death (lease TTL 2 s expires) -> survivors hold next round"),
    ("churn", "churn 10%: formation start -> all hold the round"),
]


def fmt_ms(series: Series | None) -> str:
    if series is None or not series.times:
        return "-"
    return f"{pct(series.times, 50) * 1e3:8.1f} {pct(series.times, 99) * 1e3:8.1f}"


def report(ours: dict[int, dict[str, Series]], theirs: dict[int, dict[str, Series]], notes: list[str]) -> str:
    lines = []
    head = (f"{'N':>5} {'metric':<8} {'etcd p50':>8} {'p99 ms':>8} {'wr/ag':>6} {'cas/ag':>6} {'ok':>6} | "
            f"{'c10d p50':>8} {'p99 ms':>8} {'wr/ag':>6} {'cas/ag':>6} {'ok':>6} | {'p99 c10d/etcd':>13}")
    lines.append(head)
    lines.append("-" * len(head))
    for n in sorted(set(ours) | set(theirs)):
        for key, _label in METRICS:
            a, b = ours.get(n, {}).get(key), theirs.get(n, {}).get(key)
            if a is None and b is None:
                continue
            ratio = "-"
            if a is not None and b is not None and a.times and b.times:
                ratio = f"{pct(b.times, 99) / pct(a.times, 99):13.1f}x"
            lines.append(f"{n:>5} {key:<8} {fmt_ms(a) if a else '-':>17} {_counts(a, key)} | "
                         f"{fmt_ms(b) if b else '-':>17} {_counts(b, key)} | {ratio:>13}")
    lines.append("")
    lines.append("metrics: " + "; ".join(f"{k} = {v}" for k, v in METRICS))
    lines.append("wr/ag = writes per agent per round (mean over trials), cas/ag = failed compare-and-set "
                 "per agent per round; ok = good trials/trials run")
    for label, table in (("etcd", ours), ("c10d", theirs)):
        for n, rows in sorted(table.items()):
            for key, s in rows.items():
                if s.note:
                    lines.append(f"note {label} N={n} {key}: {s.note}")
                for failure in s.failures:
                    lines.append(f"FAILED {label} N={n} {key}: {failure}")
    lines += notes
    lines += cpu_floor(ours)
    return "\n".join(lines)


def cpu_floor(ours: dict[int, dict[str, Series]]) -> list[str]:
    """What bounds the times when N simulated agents share this machine's cores: each
    agent's own work (watch events, decisions, peer probes) is paid N times here, once per
    node in a real cluster. After a death every survivor registers again, so each agent
    receives N events: N^2 here, N per node on a cluster."""
    lines = []
    cores = os.cpu_count() or 1
    for n, rows in sorted(ours.items()):
        for key in ("join", "death"):
            series = rows.get(key)
            if series is None or not series.cpu:
                continue
            per_agent = statistics.median(series.cpu) / n
            first = (f"first agent holds the round after p50 {pct(series.first, 50) * 1e3:.1f} ms; "
                     if series.first else "")
            lines.append(f"{key} N={n}: {first}the simulated agents used p50 {per_agent * 1e3:.2f} ms CPU each "
                         f"meanwhile, so on {cores} cores the last cannot hold the round before "
                         f"~{per_agent * n / cores * 1e3:.0f} ms")
    return lines


def _counts(series: Series | None, key: str) -> str:
    if series is None:
        return f"{'-':>6} {'-':>6} {'-':>6}"
    ok = f"{series.trials - len(series.failures)}/{series.trials}"
    if key == "churn" or not series.writes:
        return f"{'-':>6} {'-':>6} {ok:>6}"
    return f"{statistics.mean(series.writes):6.2f} {statistics.mean(series.retries):6.2f} {ok:>6}"


def targets(ours: dict[int, dict[str, Series]]) -> list[str]:
    lines = ["", "targets (issue 4):"]
    biggest = max(ours) if ours else None
    join = ours.get(biggest, {}).get("join") if biggest else None
    if join and join.times:
        p99 = pct(join.times, 99) * 1e3
        lines.append(f"  last join -> sealed p99 <= 500 ms at 1,024 agents: {p99:.1f} ms at N={biggest}"
                     + ("" if biggest == 1024 else " (1,024 did not run)")
                     + (" MET" if p99 <= 500 and biggest == 1024 else (" met at this N" if p99 <= 500 else " MISSED")))
    worst = max((max(s.writes) for rows in ours.values() for k, s in rows.items() if s.writes and k != "churn"),
                default=None)
    if worst is not None:
        lines.append(f"  <= 2 etcd writes per agent per round: worst trial {worst:.2f} "
                     + ("MET" if worst <= 2 else "MISSED"))
    churn = [(n, rows["churn"]) for n, rows in sorted(ours.items()) if "churn" in rows and rows["churn"].trials]
    if churn:
        good = all(not s.failures for _n, s in churn)
        lines.append("  correct under 10% churn: " + ", ".join(
            f"N={n} {s.trials - len(s.failures)}/{s.trials}" for n, s in churn)
            + (" MET" if good else " MISSED"))
        lines.append(f"churn correct: {'yes' if good else 'no'}")
    return lines


def _last_error_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip()[0] not in "^~>"]
    return lines[-1] if lines else type(exc).__name__


# == main =====================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="8,64,256,1024", help="agent counts, comma-separated")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--trials-1024", type=int, default=20, help="trials at N >= 1024 (setup is slow)")
    p.add_argument("--ttl-trials", type=int, default=20, help="deaths by lease expiry (TTL 2 s)")
    p.add_argument("--ttl-max-agents", type=int, default=8, help="largest N for the TTL-expiry deaths")
    p.add_argument("--c10d-agents", default="8,64", help="agent counts for torchelastic's c10d rendezvous")
    p.add_argument("--c10d-trials", type=int, default=20)
    p.add_argument("--c10d-last-call", type=float, default=0.5, help="c10d last-call timeout, s (default 30)")
    p.add_argument("--c10d-keepalive", type=float, default=1.0,
                   help="c10d keep-alive interval, s (default 5); below its 1 s polling, live nodes get dropped")
    p.add_argument("--c10d-attempts", type=int, default=3, help="c10d keep-alive attempts (default 3)")
    p.add_argument("--procs", type=int, default=0, help="worker processes (default: N/64, 1..4)")
    p.add_argument("--budget", type=float, default=40.0, help="seconds per series before trials are cut")
    p.add_argument("--n-cap", type=float, default=120.0,
                   help="seconds one N may take in all; past it, what ran is kept and the rest is cut")
    p.add_argument("--series", default=",".join(k for k, _ in METRICS),
                   help="which of our series to run, comma-separated (join* and death run together)")
    p.add_argument("--quick", action="store_true", help="8 and 64 agents, 5 trials; c10d at 8 (~1 min)")
    args = p.parse_args(argv)
    if args.quick:
        quick = {"agents": "8,64", "trials": 3, "trials_1024": 3, "ttl_trials": 2, "c10d_agents": "8",
                 "c10d_trials": 3, "budget": 8.0, "n_cap": 40.0}
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.series = set(args.series.split(","))
    unknown = args.series - {k for k, _ in METRICS}
    if unknown:
        p.error(f"unknown --series {', '.join(sorted(unknown))}: choose from {', '.join(k for k, _ in METRICS)}")
    args.agent_counts = [int(x) for x in str(args.agents).split(",") if x]
    args.c10d_counts = [int(x) for x in str(args.c10d_agents).split(",") if x]
    if any(n < 2 for n in args.agent_counts + args.c10d_counts):
        p.error("every agent count must be >= 2 (a death needs a survivor)")
    return args


def main(argv=None) -> int:
    from elastic.rendezvous.etcd_server import EtcdServer

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks below
    print(f"bench_rendezvous: {' '.join(sys.argv)}  ({os.cpu_count()} CPUs)", flush=True)
    ours: dict[int, dict[str, Series]] = {}
    theirs: dict[int, dict[str, Series]] = {}
    notes: list[str] = []
    wall = time.monotonic()
    with EtcdServer() as server:
        observer = EtcdObserver(server.endpoint)
        try:
            for n in args.agent_counts:
                t = time.monotonic()
                try:
                    ours[n] = bench_etcd(args, server.endpoint, observer, n)
                except (RuntimeError, OSError) as exc:
                    print(exc, flush=True)
                    notes.append(f"etcd N={n} did not run: " + _last_error_line(exc))
                print(f"etcd N={n}: {time.monotonic() - t:.0f}s", flush=True)
        finally:
            observer.close()
    if args.c10d_counts:
        from torch.distributed import TCPStore

        master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
        endpoint = f"127.0.0.1:{master.port}"
        observer = C10dObserver(master)
        for n in args.c10d_counts:
            t = time.monotonic()
            try:
                theirs[n] = bench_c10d(args, endpoint, observer, n)
            except (RuntimeError, OSError) as exc:
                print(exc, flush=True)
                notes.append(f"c10d N={n} did not run: " + _last_error_line(exc))
            print(f"c10d N={n}: {time.monotonic() - t:.0f}s", flush=True)
        del master
    skipped = sorted(set(args.agent_counts) - set(args.c10d_counts))
    if skipped:
        notes.append(f"c10d not run at N={','.join(map(str, skipped))} (--c10d-agents caps it)")
    print()
    print(report(ours, theirs, notes + targets(ours)))
    print(f"\ntotal {time.monotonic() - wall:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
