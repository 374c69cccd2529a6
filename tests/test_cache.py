"""The attention layout of a ragged step: each query sees exactly its own slot, up to its own position."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fot.errors import InvalidRequestError
from fot.speculative.cache import KVCache, Layout, PaddedKVCache, PrefixStore, common_prefix


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
    step = Layout.build(slots, starts, counts)
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
    cache = (PaddedKVCache if padded else KVCache)(2, 5, 1, 8, 4)
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


def test_prefix_store_matches_supersedes_and_evicts_the_least_recently_used():
    cache = KVCache(2, 3, 1, 16, 4)  # a token's entries: k and v, 2 layers, 4 floats each = 64 bytes
    for slot, n in [(0, 6), (1, 8), (2, 4)]:
        assert cache.allocate() == slot
        cache.k[:, slot, :, :n], cache.v[:, slot, :, :n] = float(slot + 1), -float(slot + 1)
        cache.advance([slot], [n])
    store = PrefixStore(budget_bytes=64 * 14, min_new=2)
    store.put([1, 2, 3, 4, 5, 6], cache, 0)
    store.put(list(range(1, 10)), cache, 1)  # the cache holds 8 of the 9 tokens; supersedes [1..6]
    assert len(store) == 1 and store.bytes == 8 * 64
    key, n = store.match([1, 2, 3, 9, 9], limit=4)
    assert n == 3 and store.match([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], limit=9) == (key, 8)
    assert store.match([7, 1, 2], limit=2) == (None, 0)
    store.put([7, 7, 7, 7], cache, 2)
    other = KVCache(2, 1, 1, 16, 4)
    store.load(key, other, other.allocate(), 3)  # used: now the most recent
    assert other.lengths[0] == 3 and (other.k[:, 0, :, :3] == 2).all() and (other.v[:, 0, :, :3] == -2).all()
    store.put([5, 5, 5, 5], cache, 2)  # 16 tokens would not fit in 14: the least recently used ([7]*4) goes
    assert store.match([7, 7, 7, 7, 1], 4)[1] == 0 and store.match([5, 5, 5, 5, 1], 4)[1] == 4
    assert store.match(list(range(1, 10)), 8)[1] == 8 and store.bytes == 12 * 64
    store.put([1, 2, 3, 4, 5, 6, 7, 99], cache, 1)  # adds 1 token (< min_new) to the [1..8] entry: not kept
    store.put([9], cache, 2)  # shorter than min_new: never matchable, not kept
    assert len(store) == 2 and store.bytes == 12 * 64
    tiny = PrefixStore(budget_bytes=64 * 3, min_new=2)
    tiny.put([5, 5, 5, 5], cache, 2)  # larger than the whole budget: not kept
    assert len(tiny) == 0 and tiny.bytes == 0
    with pytest.raises(InvalidRequestError, match="empty slot"):
        store.load(key, other, 0, 2)


def test_common_prefix_across_slice_boundaries():
    a = list(range(200))
    for cut in (0, 1, 63, 64, 65, 130, 199):
        b = a[:cut] + [-1] + a[cut + 1 :]
        assert common_prefix(a, b, 500) == cut and common_prefix(a, b, cut // 2) == cut // 2
    assert common_prefix(a, a, 500) == 200 and common_prefix(a, a[:70], 500) == 70


@pytest.mark.parametrize("padded", [False, True])
def test_grow_keeps_what_is_held_and_frees_the_new_slots(padded):
    cache = (PaddedKVCache if padded else KVCache)(2, 2, 1, 4, 4)
    a, b = cache.allocate(), cache.allocate()
    cache.plan([a, b], [3, 2])
    cache.k[:, a, :, :3], cache.v[:, b, :, :2] = 1.0, 2.0
    cache.advance([a, b], [3, 2])
    cache.grow(4, 9)
    assert cache.k.shape == (2, 4, 1, 9, 4) and cache.max_len == 9 and cache.n_free == 2
    assert (cache.k[:, a, :, :3] == 1).all() and (cache.v[:, b, :, :2] == 2).all() and cache.lengths == [3, 2, 0, 0]
    assert cache.positions == [3, 2, 0, 0] and [cache.allocate(), cache.allocate()] == [2, 3]
    if padded:
        assert cache.valid.shape == (4, 9) and cache.valid[a, :3].all() and not cache.valid[2:].any()
    cache.plan([a], [6])  # the longer slot is usable
    with pytest.raises(InvalidRequestError, match="only grows"):
        cache.grow(3, 9)


def test_pad_rows_past_the_context_take_its_last_rope_position():
    """A sample at the end of the context, padded to another's longer draft: its pad rows' positions ran past
    RoPE's table, and the lookup failed the whole step (IndexError: index 512). Pad rows are masked anyway."""
    cache = PaddedKVCache(1, 2, 1, 600, 4)
    a, b = cache.allocate(), cache.allocate()
    cache.plan([a, b], [510, 100])
    cache.advance([a, b], [510, 100])
    layout = cache.plan([a, b], [9, 9])  # a's last real token is at 510 or 511, padded to b's 9
    table = torch.arange(512, dtype=torch.float32)[:, None].expand(512, 4)
    cos, _ = layout.rope(table, table, torch.float32)
    assert cos[:, 0, 0].tolist() == [510, *[511] * 8, *range(100, 109)]
