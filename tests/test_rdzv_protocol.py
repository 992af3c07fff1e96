"""The rendezvous decisions, from tables: state in, action out (no etcd, no clock)."""

from __future__ import annotations

import json

import pytest

from elastic.rendezvous.protocol import (
    Closed,
    FailureClaim,
    JobClosed,
    Joined,
    Member,
    NodeRecord,
    Register,
    RoundEnd,
    RunState,
    Seal,
    SealedRound,
    Settings,
    Wait,
    WaitAsSpare,
    admissible,
    completing_record,
    decide_blame,
    decide_growth,
    decide_join,
)

S = Settings(min_nodes=2, max_nodes=3, last_call_timeout=10.0, cooldown_base=10.0, cooldown_cap=100.0,
             rejoin_timeout=60.0)


def members(*names: str) -> dict[str, Member]:
    return {n: Member(n, f"10.0.0.{i}", 1000 + i, 1) for i, n in enumerate(names)}


def sealed(round_: int, *names: str) -> SealedRound:
    return SealedRound.of(round_, list(members(*names).values()), 0)


def test_unregistered_node_registers():
    assert decide_join(RunState(round=0), "a", S, 0.0, None) == Register()


def test_below_min_waits_without_deadline():
    action = decide_join(RunState(members=members("a")), "a", S, 0.0, None)
    assert action == Wait(until=float("inf"))


def test_min_reached_waits_last_call_for_newcomers():
    state = RunState(members=members("a", "b"))
    assert decide_join(state, "a", S, 5.0, min_reached_at=5.0) == Wait(until=15.0)
    action = decide_join(state, "a", S, 15.0, min_reached_at=5.0)
    assert isinstance(action, Seal) and action.record.node_ids == ("a", "b")


def test_max_seals_at_once():
    action = decide_join(RunState(members=members("c", "a", "b")), "a", S, 0.0, 0.0)
    assert isinstance(action, Seal) and action.record.node_ids == ("a", "b", "c")


def test_the_arrival_that_completes_the_round_seals_it_with_its_registration():
    state = RunState(members=members("a", "b"))
    c = Member("c", "10.0.0.9", 1009, 1)
    record = completing_record(state, c, S, 0.0, min_reached_at=0.0)  # c makes MAX
    assert record is not None and record.node_ids == ("a", "b", "c")
    # An arrival that only reaches MIN starts the last call: nothing to seal yet.
    assert completing_record(RunState(members=members("a")), c, S, 0.0, None) is None
    # The last survivor of round 0 coming back completes round 1 at once.
    back = RunState(round=1, members=members("a"), previous=sealed(0, "a", "b", "x"),
                    previous_alive=frozenset({"a", "b"}))
    record = completing_record(back, Member("b", "10.0.0.1", 1001, 1), S, 0.0, 0.0)
    assert record is not None and record.node_ids == ("a", "b")


def test_survivors_back_seal_at_once_without_last_call():
    # Round 1 after c died: a and b were the live members of round 0 and both are back.
    state = RunState(round=1, members=members("b", "a"), previous=sealed(0, "b", "a", "c"),
                     previous_alive=frozenset({"a", "b"}))
    action = decide_join(state, "a", S, 100.0, min_reached_at=100.0)
    assert isinstance(action, Seal)
    assert action.record.node_ids == ("b", "a")  # survivors keep their order (stable ranks)


def test_a_live_survivor_is_awaited_past_the_last_call_up_to_the_rejoin_timeout():
    # c is alive but still stopping its workers: the last call (10 s) is for newcomers.
    state = RunState(round=1, members=members("a", "b"), previous=sealed(0, "a", "b", "c"),
                     previous_alive=frozenset({"a", "b", "c"}))
    assert decide_join(state, "a", S, 0.0, 0.0) == Wait(until=60.0)
    assert decide_join(state, "a", S, 30.0, 0.0) == Wait(until=60.0)
    action = decide_join(state, "a", S, 60.0, 0.0)  # c's agent is wedged: go on without it
    assert isinstance(action, Seal) and action.record.node_ids == ("a", "b")


def test_a_registered_survivor_kept_out_by_cooldown_waits_only_the_last_call():
    state = RunState(round=1, members=members("a", "b", "c"), previous=sealed(0, "a", "b", "c"),
                     previous_alive=frozenset({"a", "b", "c"}), nodes={"c": NodeRecord(3, 0.0)})
    assert decide_join(state, "a", S, 1.0, 1.0) == Wait(until=11.0)
    action = decide_join(state, "a", S, 11.0, 1.0)
    assert isinstance(action, Seal) and action.record.node_ids == ("a", "b")


def test_newcomers_follow_survivors_by_node_id():
    state = RunState(round=1, members=members("z", "b", "a"), previous=sealed(0, "z", "b"),
                     previous_alive=frozenset({"z", "b"}))
    action = decide_join(state, "a", S, 0.0, 0.0)
    assert isinstance(action, Seal) and action.record.node_ids == ("z", "b", "a")


def test_sealed_round_gives_assignment_with_rank_offsets():
    record = SealedRound.of(0, [Member("a", "h1", 7, 2), Member("b", "h2", 8, 3)], restart_count=4)
    action = decide_join(RunState(sealed=record, members=members("a", "b")), "b", S, 0.0, None)
    assert isinstance(action, Joined)
    a = action.assignment
    assert (a.group_rank, a.num_nodes, a.world_size, a.rank_offset) == (1, 2, 5, 2)
    assert (a.master_addr, a.master_port, a.restart_count) == ("h1", 7, 4)


@pytest.mark.parametrize("nprocs", [(4, 4, 4), (2, 3, 1)])
def test_sealed_record_round_trips_and_stays_small(nprocs):
    record = SealedRound.of(7, [Member(f"node-{i}", f"10.0.0.{i}", 29500 + i, p) for i, p in enumerate(nprocs)], 2)
    assert SealedRound.from_json(record.to_json()) == record
    assert (record.master_addr, record.master_port) == ("10.0.0.0", 29500)
    # Only node ids grow with N: no per-node address or port (nobody but rank 0's is used).
    assert "10.0.0.1" not in record.to_json()


def test_node_left_out_of_a_sealed_round_waits_as_spare():
    action = decide_join(RunState(sealed=sealed(0, "a", "b"), members=members("a", "b", "c")), "c", S, 0, None)
    assert isinstance(action, WaitAsSpare)


def test_beyond_max_waits_as_spare():
    action = decide_join(RunState(members=members("a", "b", "c", "d")), "d", S, 0.0, 0.0)
    assert isinstance(action, WaitAsSpare) and "full" in action.reason


def test_closed_job():
    assert decide_join(RunState(closed=JobClosed(reason="done")), "a", S, 0, None) == Closed("done")
    assert decide_join(RunState(closed=JobClosed(ok=True, reason="finished")), "a", S, 0, None) == Closed(
        "finished", ok=True)


@pytest.mark.parametrize("record, keys", [
    (RoundEnd(failure=True, reason="rank 1 died"), {"failure": True, "reason": "rank 1 died"}),
    (JobClosed(ok=False, reason="budget spent"), {"ok": False, "reason": "budget spent"}),
])
def test_round_end_and_close_records_keep_their_json_keys(record, keys):
    """The values in etcd are read by agents of other versions: same keys, same values."""
    assert json.loads(record.to_json()) == keys
    assert type(record).from_json(json.dumps(keys)) == record


@pytest.mark.parametrize(("registered", "multiple", "expected"), [
    (("a", "b", "c"), 2, ("a", "b")),
    (("a", "b", "c", "d"), 2, ("a", "b")),  # MAX 3 cut to a multiple of 2
    (("a",), 2, ()),
])
def test_world_size_multiple(registered, multiple, expected):
    settings = Settings(min_nodes=1, max_nodes=3, last_call_timeout=1.0, world_size_multiple=multiple)
    assert tuple(admissible(RunState(members=members(*registered)), settings, 0.0)) == expected


@pytest.mark.parametrize(("failures", "now", "admitted"), [
    (1, 0.0, True),      # one failure: no cooldown
    (2, 5.0, False),     # second failure at t=0: waits base=10s (a and b meet MIN without c)
    (2, 10.0, True),
    (3, 19.0, False),    # third: 20s
    (3, 20.0, True),
    (9, 99.0, False),    # capped at 100s
    (9, 100.0, True),
])
def test_failing_node_cools_down_exponentially(failures, now, admitted):
    state = RunState(members=members("a", "b", "c"), nodes={"c": NodeRecord(failures, 0.0)})
    assert ("c" in admissible(state, S, now)) is admitted


def test_cooling_node_is_admitted_when_min_needs_it():
    # MIN is 2 and only a and c are there: keeping c out would stall the job.
    state = RunState(members=members("a", "c"), nodes={"c": NodeRecord(2, 0.0)})
    assert admissible(state, S, 1.0) == ["a", "c"]
    single = Settings(min_nodes=1, max_nodes=1, last_call_timeout=1.0)
    alone = RunState(members=members("c"), nodes={"c": NodeRecord(5, 0.0)})
    assert isinstance(decide_join(alone, "c", single, 1.0, 1.0), Seal)


@pytest.mark.parametrize(("waiting", "running", "first_seen", "now", "grow"), [
    ({"c"}, ("a", "b"), 0.0, 5.0, False),   # still debouncing
    ({"c"}, ("a", "b"), 0.0, 10.0, True),
    ({"d"}, ("a", "b", "c"), 0.0, 10.0, False),  # already at MAX: d is a spare
    (set(), ("a", "b"), None, 10.0, False),
])
def test_growth_is_debounced_and_bounded_by_max(waiting, running, first_seen, now, grow):
    state = RunState(waiting=frozenset(waiting))
    assert decide_growth(state, sealed(0, *running), S, now, first_seen) is grow


@pytest.mark.parametrize("claims, blamed", [
    # a rank died: its peers' collectives broke a moment later; the earliest claim is blamed
    ({"a": (5.0, ()), "b": (4.0, ()), "c": (4.5, ())}, "b"),
    # asymmetric partition: c keeps etcd, loses its peers; everyone reports the broken links
    ({"a": (1.0, ("c",)), "b": (2.0, ("c",)), "c": (9.0, ("a", "b"))}, "c"),
    # only c noticed (one-way loss): it cannot reach the others, the most broken links
    ({"a": (1.0, ()), "c": (9.0, ("a", "b"))}, "c"),
    # one link a-c broken, both ends report: a tie, the later member goes (rank 0 stays)
    ({"a": (1.0, ("c",)), "c": (2.0, ("a",))}, "c"),
    # claims by nodes outside the round and links to them do not count
    ({"a": (3.0, ("x",)), "x": (1.0, ("a",)), "b": (2.0, ())}, "b"),
    ({}, None),
])
def test_blame_goes_to_the_node_cut_off_else_to_the_first_failure(claims, blamed):
    as_claims = {n: FailureClaim(at, tuple(cut)) for n, (at, cut) in claims.items()}
    assert decide_blame(("a", "b", "c"), as_claims) == blamed


def test_failure_claim_round_trips_through_json():
    claim = FailureClaim(12.5, ("b", "c"))
    assert FailureClaim.from_json(claim.to_json()) == claim


def test_assignment_takes_the_master_address_from_the_first_member():
    record = SealedRound.of(0, (Member("a", "10.0.0.1", 7, 1), Member("b", "10.0.0.2", 8, 1)), 0)
    assert (record.assignment_for("b").master_addr, record.assignment_for("b").master_port) == ("10.0.0.1", 7)
