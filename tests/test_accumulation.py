"""The accumulation plan: a pure function of (G, m, W), tested with tables and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from elastic.worker.accumulation import AccumulationPlan
from elastic.errors import ConfigError


@pytest.mark.parametrize(
    "g, m, w, steps, sizes",
    [
        (8, 2, 2, 2, [[2, 2], [2, 2]]),
        (7, 1, 2, 4, [[1, 1, 1, 1], [1, 1, 1, 0]]),  # rank 1 gets a zero-weight micro-batch
        (10, 3, 3, 2, [[2, 2], [2, 1], [2, 1]]),
        (7, 7, 1, 1, [[7]]),
        (5, 4, 4, 1, [[2], [1], [1], [1]]),
    ],
)
def test_plan_table(g, m, w, steps, sizes):
    plan = AccumulationPlan(g, m, w)
    assert plan.accumulation_steps == steps
    assert [[mb.size for mb in plan.micro_batches(r)] for r in range(w)] == sizes


@given(
    g=st.integers(1, 300), m=st.integers(1, 40), w=st.integers(1, 16),
)
def test_every_position_once_and_weights_give_the_mean(g, m, w):
    if g < w:
        with pytest.raises(ConfigError, match=f"global_batch_size={g} is smaller than the world size {w}"):
            AccumulationPlan(g, m, w)
        return
    plan = AccumulationPlan(g, m, w)
    a = plan.accumulation_steps
    assert a == math.ceil(g / (m * w))
    positions = []
    total_weight = 0.0
    for r in range(w):
        mbs = plan.micro_batches(r)
        assert len(mbs) == a
        for mb in mbs:
            assert 0 <= mb.size <= m
            assert mb.weight == mb.size * w / g
            positions.extend(range(mb.start, mb.stop))
            # DDP averages over w ranks: each sample's effective weight is 1/g.
            total_weight += mb.weight / w
    assert sorted(positions) == list(range(g))
    assert total_weight == pytest.approx(1.0)


@pytest.mark.parametrize("m", [0, -3])
def test_non_positive_micro_batch(m):
    with pytest.raises(ConfigError, match=rf"micro_batch_size={m}: it must be a positive"):
        AccumulationPlan(8, m, 2)


def test_rank_out_of_range():
    with pytest.raises(ConfigError, match=r"rank=2 is outside \[0, 2\)"):
        AccumulationPlan(8, 2, 2).micro_batches(2)
