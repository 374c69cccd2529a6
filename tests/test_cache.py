"""The attention layout of a ragged step: each query sees exactly its own slot, up to its own position."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fot.speculative.cache import KVCache, Step


@st.composite
def ragged_steps(draw):
    n_slots = draw(st.integers(1, 8))
    slots = sorted(draw(st.sets(st.integers(0, n_slots - 1), min_size=1)))
    starts = [draw(st.integers(0, 20)) for _ in slots]
    counts = [draw(st.integers(1, 6)) for _ in slots]
    return slots, starts, counts


@settings(max_examples=200, deadline=None)
@given(ragged_steps())
def test_each_query_sees_its_own_prefix(case):
    slots, starts, counts = case
    step = Step.build(slots, starts, counts)
    rows, _, n, kv_len = step.mask.shape
    assert kv_len == max(s + c for s, c in zip(starts, counts, strict=False))
    assert step.pos.tolist() == [s + i for s, c in zip(starts, counts, strict=False) for i in range(c)]
    dest = step.dest if step.dest is not None else torch.arange(rows * n)
    for t in range(len(step.pos)):
        row, i = divmod(int(dest[t]), n)
        assert row == int(step.slot[t])
        visible = step.mask[row, 0, i].nonzero().flatten().tolist()
        assert visible == list(range(int(step.pos[t]) + 1))  # its cache + its sample's earlier new tokens


def test_slots_are_reused_lowest_first():
    cache = KVCache(1, 3, 1, 8, 4)
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    cache.advance([1], [5])
    cache.release(1)
    assert cache.n_free == 1 and cache.allocate() == 1 and cache.lengths[1] == 0


@pytest.mark.parametrize("padded", [False, True])
def test_compact_moves_samples_into_the_lowest_free_slots(padded):
    cache = KVCache(2, 5, 1, 8, 4, padded=padded)
    slots = [cache.allocate() for _ in range(5)]
    for s in slots:
        cache.plan([s], [s + 1])
        cache.k[:, s, :, : s + 1] = float(s)
        cache.advance([s], [s + 1])
    cache.release(0)
    cache.release(2)
    moves = cache.compact([1, 3, 4])
    assert moves == {4: 0, 3: 2}
    assert cache.lengths[:3] == [5, 2, 4] and cache.positions[:3] == [5, 2, 4]
    assert (cache.k[:, 0, :, :5] == 4).all() and (cache.k[:, 2, :, :4] == 3).all()
    if padded:
        assert cache.valid[0, :5].all() and cache.valid[2, :4].all()
    assert [cache.allocate(), cache.allocate()] == [3, 4] and cache.n_free == 0
    assert cache.compact([0, 1, 2, 3, 4]) == {}
