"""The elastic sampler: order from (seed, epoch) only; step s = positions [s*G, (s+1)*G); an epoch
is a permutation computed per index, in O(1) memory."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from elastic.worker.accumulation import AccumulationPlan
from elastic.errors import ConfigError
from elastic.worker.sampler import ElasticSampler


def test_same_seed_same_order_other_seed_or_epoch_differs():
    a, b = ElasticSampler(50, 8, seed=3), ElasticSampler(50, 8, seed=3)
    assert [a.samples(s).ids for s in range(12)] == [b.samples(s).ids for s in range(12)]
    assert a.epoch_order(0).tolist() != ElasticSampler(50, 8, seed=4).epoch_order(0).tolist()
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()


def test_epoch_drops_the_tail_so_every_step_has_g_samples():
    s = ElasticSampler(30, 7, seed=0)
    assert s.steps_per_epoch == 4
    steps = [s.samples(k) for k in range(8)]
    assert all(len(x.ids) == 7 for x in steps)
    assert [(x.epoch, x.step_in_epoch) for x in steps] == [(e, k) for e in (0, 1) for k in range(4)]
    epoch0 = [i for x in steps[:4] for i in x.ids]
    assert len(set(epoch0)) == 28 and epoch0 == s.epoch_order(0)[:28].tolist()


@given(n=st.integers(1, 200), g=st.integers(1, 50), step=st.integers(0, 500))
def test_position_round_trips(n, g, step):
    if n < g:
        with pytest.raises(ConfigError, match=f"the dataset has {n} samples, fewer than global_batch_size={g}"):
            ElasticSampler(n, g)
        return
    s = ElasticSampler(n, g)
    assert s.step_at(*s.position(step)) == step


@given(
    n=st.integers(4, 120), g=st.integers(4, 40), m=st.integers(1, 9),
    worlds=st.lists(st.integers(1, 4), min_size=1, max_size=6),
)
def test_each_sample_once_per_epoch_whatever_the_world_size_per_step(n, g, m, worlds):
    """Resizing between steps: the union over ranks of each step is that step's G ids, and
    an epoch sees every sample at most once (exactly once except the dropped tail)."""
    if n < g:
        return
    s = ElasticSampler(n, g, seed=7)
    seen: list[int] = []
    for step in range(s.steps_per_epoch):
        w = worlds[step % len(worlds)]
        plan = AccumulationPlan(g, m, w)
        ids = s.samples(step).ids
        got = [ids[i] for r in range(w) for mb in plan.micro_batches(r) for i in range(mb.start, mb.stop)]
        assert got == list(ids)
        seen.extend(got)
    assert len(seen) == len(set(seen)) == s.steps_per_epoch * g


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="global_batch_size=0"):
        ElasticSampler(10, 0)
    with pytest.raises(ConfigError, match="seed=-1"):
        ElasticSampler(10, 2, seed=-1)
    with pytest.raises(ConfigError, match="an epoch has 5 steps"):
        ElasticSampler(10, 2).step_at(0, 5)
    with pytest.raises(ConfigError, match="at most 2\\^62 are supported"):
        ElasticSampler(1 << 62, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 31, 64, 100, 1000, 4097])
def test_every_epoch_is_a_permutation(n):
    """Small N exhaustively, powers of two and not, for several seeds and epochs; one id at
    a time (Python ints) and many at once (numpy) give the same order."""
    for seed, epoch in [(0, 0), (0, 1), (9, 0), (9, 5)]:
        sampler = ElasticSampler(n, 1, seed=seed)
        order = sampler.epoch_order(epoch).tolist()
        assert sorted(order) == list(range(n)), (seed, epoch)
        assert [sampler.permutation(epoch).at(p) for p in range(n)] == order
    if n >= 100:  # a shuffle, not a near-identity
        assert sum(i == p for p, i in enumerate(order)) < n // 10


def test_ten_billion_samples_no_collisions_and_no_memory_growth():
    import tracemalloc

    import numpy as np

    n = 10**10
    sampler = ElasticSampler(n, 1024, seed=1)
    positions = np.random.default_rng(0).choice(n, size=200_000, replace=False)
    ids = sampler.permutation(3)(positions)
    assert len(np.unique(ids)) == len(ids) and ids.min() >= 0 and ids.max() < n
    assert ids.max() > n // 2  # spread over the whole range
    sampler.samples(0)
    tracemalloc.start()
    for step in range(10**6, 10**6 + 50):
        assert len(set(sampler.samples(step).ids)) == 1024
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 512 * 1024, f"building steps of 10^10 samples peaked at {peak} bytes"
