"""The elastic rendezvous with several agents as real processes on one real etcd."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from elastic.errors import StaleRoundError
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.worker.fencing import RoundFence
from elastic.launcher.config import LaunchConfig
from elastic.rendezvous.settings import RendezvousSettings
from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.rendezvous.protocol import Member, SealedRound
from elastic.rendezvous.handler import EtcdRendezvous
from helpers import Job, wait_gone, wait_until


@pytest.fixture
def job_factory(etcd_server, run_id, tmp_path):
    jobs: list[Job] = []

    def make(nnodes: str, conf: str = "", max_restarts: int = 3, endpoint: str | None = None,
             flags: tuple[str, ...] = ()) -> Job:
        job = Job(endpoint or etcd_server.endpoint, f"{run_id}-{len(jobs)}", tmp_path, nnodes, conf, max_restarts,
                  flags=flags)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.kill_all()


# For tests about the rendezvous, not about fast restarts: workers start cold. The warm
# spares (--warm-pool) start importing 10 s into a round whose workers report no steps, and on
# a small host their imports only slow down the workers that are still starting.
COLD = ("--no-warm-pool",)


def test_shrink_on_death_of_master_node_without_last_call_wait(job_factory):
    job = job_factory("2:3", flags=COLD)
    for node in ("a", "b", "c"):
        job.start(node)
    first = job.wait_round(0, {"a", "b", "c"})
    assert first["a"]["GROUP_RANK"] == "0"  # node a hosts MASTER_ADDR
    master_worker = job.worker_pid("a", 0)
    killed_at = time.time()
    os.kill(job.agents["a"].pid, signal.SIGKILL)  # the whole node: its workers die with it
    second = job.wait_round(1, {"b", "c"})
    # Lease TTL 3 s, last call 30 s: the survivors seal as soon as the dead node's lease
    # expires and both are back, never after the last-call window.
    sealed = next(e for e in job.events("b") if e["event"] == "round_sealed" and e["round"] == 1)
    assert sealed["time"] - killed_at < 3 + 5, f"sealed {sealed['time'] - killed_at:.1f}s after the kill"
    assert wait_gone({master_worker}) == set(), "the dead node's worker outlived its agent"
    assert {v["WORLD_SIZE"] for v in second.values()} == {"2"}
    assert [second[n]["GROUP_RANK"] for n in ("b", "c")] == ["0", "1"]  # survivors keep their order
    assert second["b"]["TORCHELASTIC_RESTART_COUNT"] == "1"
    codes = job.finish()
    assert codes["b"] == 0 and codes["c"] == 0


def test_local_worker_crash_stops_every_worker_of_the_job_fast(job_factory):
    job = job_factory("2:2", conf="last_call_timeout=1", flags=COLD)
    for node in ("a", "b"):
        job.start(node)
    job.wait_round(0, {"a", "b"})
    remote_worker = job.worker_pid("b", 0)
    killed_at = time.monotonic()
    os.kill(job.worker_pid("a", 0), signal.SIGKILL)
    assert wait_gone({remote_worker}, timeout=10) == set()
    stopped = time.monotonic() - killed_at
    assert stopped < 2.0, f"the remote worker stopped {stopped:.2f}s after the crash"
    job.wait_round(1, {"a", "b"})
    assert job.finish() == {"a": 0, "b": 0}


def test_growth_on_arrival_is_free(job_factory):
    job = job_factory("2:3", conf="last_call_timeout=1", flags=COLD)
    job.start("a")
    job.start("b")
    job.wait_round(0, {"a", "b"})
    job.start("c")
    grown = job.wait_round(1, {"a", "b", "c"})
    assert {v["WORLD_SIZE"] for v in grown.values()} == {"3"}
    assert {v["TORCHELASTIC_RESTART_COUNT"] for v in grown.values()} == {"0"}  # no restart spent
    # A plain script (no TrainLoop) cannot be reconfigured in-process: its workers restart.
    assert job.worker_pid("a", 1) != job.worker_pid("a", 0)
    assert job.finish() == {"a": 0, "b": 0, "c": 0}


def test_spare_replaces_a_failed_node(job_factory):
    job = job_factory("2:2", conf="last_call_timeout=1", flags=COLD)
    job.start("a")
    job.start("b")
    job.wait_round(0, {"a", "b"})
    job.start("spare")
    assert job.agents["spare"].poll() is None
    assert job.round_view(1) == {}  # a spare alone does not end the running round
    os.kill(job.agents["b"].pid, signal.SIGKILL)
    replaced = job.wait_round(1, {"a", "spare"})
    assert {v["WORLD_SIZE"] for v in replaced.values()} == {"2"}
    codes = job.finish()
    assert codes["a"] == 0 and codes["spare"] == 0


def test_a_spare_never_needed_ends_with_the_job(job_factory):
    """The last member to finish closes the job as a success: a node still waiting as a
    spare learns it by watch and exits 0 instead of waiting for a round that never comes."""
    job = job_factory("2:2", conf="last_call_timeout=1")
    job.start("a")
    job.start("b")
    job.wait_round(0, {"a", "b"})
    job.start("spare")
    wait_until("the spare to wait", lambda: "node spare waits" in job.log("spare"), 60)
    assert job.finish() == {"a": 0, "b": 0, "spare": 0}
    assert "not needed: job finished: every worker of round 0 exited 0" in job.log("spare")


def test_graceful_leave_is_a_scale_down_not_a_failure(job_factory):
    job = job_factory("2:3", conf="last_call_timeout=1", flags=COLD)
    for node in ("a", "b", "c"):
        job.start(node)
    job.wait_round(0, {"a", "b", "c"})
    job.agents["c"].send_signal(signal.SIGTERM)
    assert job.agents["c"].wait(30) == 0
    smaller = job.wait_round(1, {"a", "b"})
    assert {v["TORCHELASTIC_RESTART_COUNT"] for v in smaller.values()} == {"0"}
    codes = job.finish()
    assert codes["a"] == 0 and codes["b"] == 0


def test_min_not_reachable_fails_with_clear_reason(job_factory):
    job = job_factory("2", conf="join_timeout=2")
    proc = job.start("alone")
    assert proc.wait(30) == 1
    assert "only 1 of at least 2 nodes joined" in job.log("alone")


def test_two_run_ids_on_one_etcd_are_isolated(job_factory):
    one, two = job_factory("2", conf="join_timeout=3"), job_factory("2", conf="join_timeout=3")
    one.start("a")
    two.start("b")
    assert one.agents["a"].wait(30) == 1 and two.agents["b"].wait(30) == 1
    assert "only 1 of at least 2" in one.log("a") and "only 1 of at least 2" in two.log("b")


def test_failing_node_is_cooled_down_then_readmitted(job_factory, etcd_server):
    # The cooldown (3 s) outlasts the last call (1 s): good seals round 2 alone before it ends.
    job = job_factory("1:2", conf="last_call_timeout=1,cooldown_base=3", max_restarts=10, flags=COLD)
    job.start("good")
    job.start("bad")
    job.wait_round(0, {"good", "bad"})
    os.kill(job.worker_pid("bad", 0), signal.SIGKILL)  # first failure: no cooldown
    job.wait_round(1, {"good", "bad"})
    failed_at = time.monotonic()
    os.kill(job.worker_pid("bad", 1), signal.SIGKILL)  # second failure: 3 s cooldown
    readmitted = job.wait_round(3, {"good", "bad"}, timeout=30)  # growth once the cooldown ended
    assert time.monotonic() - failed_at >= 2.5
    assert {v["WORLD_SIZE"] for v in readmitted.values()} == {"2"}
    # Meanwhile good went on alone (its round-2 worker may not have got far before growth).
    sealed = [e for e in job.events("good") if e["event"] == "round_sealed"]
    assert [(e["round"], e["world_size"]) for e in sealed] == [(0, 2), (1, 2), (2, 1), (3, 2)]
    client = connect(EtcdConfig(etcd_server.endpoint))
    record = json.loads(client.get(f"/elastic/{job.run_id}/nodes/bad")[0])
    innocent = client.get(f"/elastic/{job.run_id}/nodes/good")[0]
    client.close()
    # good's worker died too each time (its peer vanished), but the blame went to bad.
    assert record["failures"] == 2 and innocent is None
    job.finish()


def test_stale_round_commit_is_refused(etcd_server, run_id):
    client = connect(EtcdConfig(etcd_server.endpoint))
    backend = EtcdBackend(client, "elastic", run_id, "a")
    backend.announce()
    backend.sync()
    member = Member("a", "127.0.0.1", 1, 1)
    assert backend.seal(SealedRound.of(0, [member], 0))
    fence = RoundFence(EtcdConfig(etcd_server.endpoint), "elastic", run_id, 0)
    fence()  # round 0 is the newest sealed round: the commit may go ahead
    assert backend.bump_round(0, reason="test", failed_node=None)
    fence()  # moved on but not sealed yet: round 0's workers may still save their last step
    assert backend.seal(SealedRound.of(1, [member], 0))
    with pytest.raises(StaleRoundError, match="belongs to rendezvous round 0 but the newest sealed round is 1"):
        fence()
    backend.shutdown()


def test_mirror_members_follow_re_registration_and_lease_loss(etcd_server, run_id):
    """Members are parsed once and cached (mirror.KeyIndex.parsed): a changed or vanished
    registration must still show at once in every agent's view."""
    backends = [EtcdBackend(connect(EtcdConfig(etcd_server.endpoint)), "elastic", run_id, n) for n in "ab"]
    for backend in backends:
        backend.open_lease(10)
        backend.announce()
        backend.sync()
    watcher, other = backends
    other.register(0, Member("b", "127.0.0.1", 1, 1))
    wait_until("b registered", lambda: watcher.members(0).get("b") == Member("b", "127.0.0.1", 1, 1), 10)
    other.register(0, Member("b", "127.0.0.2", 2, 4))
    wait_until("b's new record", lambda: watcher.members(0).get("b") == Member("b", "127.0.0.2", 2, 4), 10)
    other.revoke_lease()  # the registration is bound to the lease
    wait_until("b's registration gone", lambda: "b" not in watcher.members(0), 10)
    for backend in backends:
        backend.shutdown()


def test_etcd_restart_mid_run_does_not_disturb_training(job_factory, private_etcd):
    job = job_factory("2", conf="last_call_timeout=1,lease_ttl=5", endpoint=private_etcd.endpoint)
    job.start("a")
    job.start("b")
    job.wait_round(0, {"a", "b"})
    workers = {job.worker_pid("a", 0), job.worker_pid("b", 0)}
    private_etcd.restart()
    # Training goes on: after the outage both agents still run round 0 with the same workers,
    # and they finish it without a restart.
    codes = job.finish()
    assert codes == {"a": 0, "b": 0}
    assert job.round_view(1) == {}
    assert all(e["event"] != "failure" for n in ("a", "b") for e in job.events(n)), job.log("a")
    assert workers  # (the same two workers finished: no second round was ever started)


def test_agent_cut_off_longer_than_ttl_rejoins_without_double_training(job_factory):
    job = job_factory("1:2", conf="last_call_timeout=1", flags=COLD)
    job.start("a")
    job.start("b")
    job.wait_round(0, {"a", "b"})
    os.kill(job.agents["b"].pid, signal.SIGSTOP)  # b's agent is cut off: its lease expires
    try:
        alone = job.wait_round(1, {"a"})
        assert alone["a"]["WORLD_SIZE"] == "1"
    finally:
        os.kill(job.agents["b"].pid, signal.SIGCONT)
    # b learns its lease expired, stops what is left of its old workers, and comes back
    # through growth: one group again, never two.
    both = job.wait_round(2, {"a", "b"})
    assert {v["WORLD_SIZE"] for v in both.values()} == {"2"}
    assert set(job.round_view(1)) == {"a"}  # b never trained on its own while cut off
    assert job.finish() == {"a": 0, "b": 0}


def test_two_agents_with_one_node_id_get_a_clear_error(job_factory, etcd_server):
    job = job_factory("2", conf="join_timeout=20")
    first_agent = job.start("twin")
    client = connect(EtcdConfig(etcd_server.endpoint))
    key = f"/elastic/{job.run_id}/alive/twin"
    deadline = time.monotonic() + 30
    while client.get(key)[0] is None:  # the first agent has claimed the id once its key exists
        assert time.monotonic() < deadline and first_agent.poll() is None, job.log("twin")
        time.sleep(0.05)
    client.close()
    second = Job(job.endpoint, job.run_id, job.outdir / "second", "2", "join_timeout=20")
    second.outdir.mkdir()
    proc = second.start("twin")
    try:
        assert proc.wait(30) == 2
        assert "node id 'twin' is in use by another live agent" in second.log("twin")
        assert first_agent.poll() is None  # the first one is undisturbed
    finally:
        second.kill_all()


def test_failure_found_before_workers_start_counts_against_the_node_not_the_budget(etcd_server, run_id):
    """A node the others cannot reach is failed before any worker starts: its failure record
    (hence cooldown) moves, the job's restart budget does not."""
    backend = EtcdBackend(connect(EtcdConfig(etcd_server.endpoint)), "elastic", run_id, "a")
    backend.announce()
    backend.sync()
    assert backend.bump_round(0, reason="node c is unreachable", failed_node="c", restart=False)
    assert (backend.restarts(), backend.state().nodes["c"].failures) == (0, 1)
    assert backend.bump_round(1, reason="rank 2 hung", failed_node="c")
    assert (backend.restarts(), backend.state().nodes["c"].failures) == (1, 2)
    backend.shutdown()


class _Clock:
    """The rendezvous' clock, moved on by the test (etcd, leases and watches stay real)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class _InProcessAgent:
    """An EtcdRendezvous with its own etcd client, whose join-loop turns the test can count."""

    def __init__(self, endpoint: str, run_id: str, node: str, clock: _Clock) -> None:
        settings = RendezvousSettings(join_timeout=60.0, last_call_timeout=1.0)
        config = LaunchConfig(entrypoint=__file__, args=(), min_nodes=2, max_nodes=3, rdzv_endpoint=endpoint,
                              run_id=run_id, node_id=node, rdzv=settings)
        self.backend = EtcdBackend(connect(EtcdConfig(endpoint)), "elastic", run_id, node, clock=clock)
        self.rdzv = EtcdRendezvous(self.backend, config, "127.0.0.1", lambda: 29500, clock=clock)
        self._turns = 0
        self._turned = threading.Condition()
        self.rdzv.should_abort = self._turn  # called once at the top of every join-loop turn
        self.rdzv.start()

    def _turn(self) -> None:
        with self._turned:
            self._turns += 1
            self._turned.notify_all()

    def decided_again(self, timeout: float = 30.0) -> None:
        """Return once a whole join-loop turn that began after this call has ended."""
        with self._turned:
            target = self._turns + 2  # the next turn starts, ends, and the one after starts
            deadline = time.monotonic() + timeout
            while self._turns < target:
                assert time.monotonic() < deadline, f"{self.rdzv.node_id}'s join loop did not turn"
                self._turned.release()
                try:
                    self.rdzv.wake()  # the loop may be waiting for a change: this is one
                finally:
                    self._turned.acquire()
                self._turned.wait(0.05)


def saw_round(round_: int, *agents: _InProcessAgent) -> None:
    """Wait until each agent's mirror shows `round_`: an agent joins only after its watch
    showed the round move on (elastic/launcher/agent.py), else it would hold the old round again."""
    for agent in agents:
        wait_until(f"{agent.rdzv.node_id} sees round {round_}", lambda: agent.backend.current_round() == round_, 30)


def both_registered(a: _InProcessAgent, b: _InProcessAgent) -> None:
    """Wait until a and b are registered for the current round and both have seen it (so
    each has taken note of when MIN was reached, by its clock)."""
    for agent in (a, b):
        while set(agent.backend.state().members) != {"a", "b"}:
            agent.backend.wait(agent.backend.version, 1.0)
        agent.decided_again()


def test_a_survivor_slower_than_the_last_call_is_awaited(etcd_server, run_id):
    """Churn at scale found this: round 0 sealed and was at once ended (a member had died),
    and a survivor that was slow to notice re-registered for round 1 only after the last
    call; round 1 sealed without it and it waited as a spare. The last call is for newcomers:
    live members of the previous round are awaited, up to the join timeout."""
    clock = _Clock()
    agents = {n: _InProcessAgent(etcd_server.endpoint, run_id, n, clock) for n in ("a", "b", "c")}
    a, b, c = agents.values()
    pool = ThreadPoolExecutor(3)
    try:
        first = {n: pool.submit(x.rdzv.join) for n, x in agents.items()}
        assert {n: f.result(30).round for n, f in first.items()} == {"a": 0, "b": 0, "c": 0}
        assert a.rdzv.bump_round(0, reason="a member died")
        saw_round(1, *agents.values())

        # a and b re-register at once; c is slow (stopping its workers, say).
        fast = {n: pool.submit(agents[n].rdzv.join) for n in ("a", "b")}
        both_registered(a, b)
        clock.now += 2.0  # the last call (1 s) has passed since MIN (2) registered
        for agent in (a, b):
            agent.decided_again()
            assert a.backend.sealed(1) is None, "round 1 sealed without its slow survivor c"

        late = pool.submit(c.rdzv.join)
        held = {n: f.result(30) for n, f in {**fast, "c": late}.items()}
        assert {n: (x.round, x.group_rank, x.world_size) for n, x in held.items()} == {
            "a": (1, 0, 3), "b": (1, 1, 3), "c": (1, 2, 3)}

        # The wait is bounded: a survivor that does not come back within the join timeout
        # (its agent wedged with its lease alive) is left out.
        assert a.rdzv.bump_round(1, reason="a planned change")
        saw_round(2, a, b)
        fast = {n: pool.submit(agents[n].rdzv.join) for n in ("a", "b")}
        both_registered(a, b)
        clock.now += 61.0
        a.rdzv.wake()
        b.rdzv.wake()
        held = {n: f.result(30) for n, f in fast.items()}
        assert {n: (x.round, x.world_size) for n, x in held.items()} == {"a": (2, 2), "b": (2, 2)}
    finally:
        for agent in agents.values():
            agent.rdzv.should_abort = _abort
            agent.rdzv.wake()
            agent.rdzv.shutdown()
        pool.shutdown(wait=True)


def _abort() -> None:
    raise RuntimeError("test over")
