"""The attention layout of a ragged step: each query sees exactly its own slot, up to its own position."""

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
