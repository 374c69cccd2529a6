"""EMS-SD's "unpad KV cache": every sample owns a slot and grows at its own length.

A sample's entry for position p lives at index p of its slot, so nothing is ever padded inside a sample: a sample
that accepted 5 draft tokens and one that accepted 0 both write exactly what they have, at their own offsets.
Rejected entries are dropped by not advancing over them (they are overwritten later and never attended, because a
query at position p only sees keys 0..p). A finished sample frees its slot for the next request.

`PaddedKVCache` is the paper's "vanilla" baseline, kept only to measure against: every sample's cache grows by the
batch's largest step and the entries it did not keep stay behind as masked pads, so a cache index is no longer a
token position (`positions` holds those) and a `valid` mask says which entries are real.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fot.errors import InvalidRequestError


class KVCache:
    """Keys/values of layers [first_layer, first_layer + n_layers): [layers, slots, kv_heads, max_len, head_dim]."""

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        first_layer: int = 0,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.first_layer = first_layer
        self.max_len = max_len
        self.lengths = [0] * n_slots  # entries held (the next write index)
        self.positions = self.lengths  # the position of the next token: the same list, unpadded
        self._free = list(range(n_slots))  # a heap: the lowest free slot first keeps attention rows dense

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise InvalidRequestError("no free cache slot")
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def grow(self, n_slots: int, max_len: int) -> None:
        """Make room for more samples or longer ones (requests that arrived while others run): new tensors,
        everything held copied over, the new slots free."""
        layers, old_slots, heads, old_len, dim = self.k.shape
        if n_slots < old_slots or max_len < old_len:
            raise InvalidRequestError("a cache only grows")
        for name in ("k", "v"):
            held = getattr(self, name)
            bigger = held.new_zeros(layers, n_slots, heads, max_len, dim)
            bigger[:, :old_slots, :, :old_len] = held
            setattr(self, name, bigger)
        self.max_len = max_len
        self.lengths += [0] * (n_slots - old_slots)
        for slot in range(old_slots, n_slots):
            heapq.heappush(self._free, slot)

    def copy_prefix(self, source: int, dest: int, n: int) -> None:
        """Give the (new, empty) sample in slot `dest` the first n entries of slot `source`, of every layer: the
        cache of a shared prompt prefix, computed once."""
        if not 0 <= n <= self.lengths[source]:
            raise InvalidRequestError("copy_prefix: at most the source's entries")
        self.load_prefix(dest, self.k[:, source], self.v[:, source], n)

    def load_prefix(self, dest: int, k: Tensor, v: Tensor, n: int) -> None:
        """Fill the empty slot `dest` with the first n entries of k/v ([layers, kv_heads, >= n, head_dim])."""
        if self.lengths[dest] != 0:
            raise InvalidRequestError("a prefix goes into an empty slot")
        self.k[:, dest, :, :n] = k[:, :, :n]
        self.v[:, dest, :, :n] = v[:, :, :n]
        self.lengths[dest] = n

    def compact(self, slots: list[int]) -> dict[int, int]:
        """Move the samples in the highest occupied `slots` into the lowest free ones, so that the occupied slots
        are 0..n-1 and attention spends nothing on the rows of finished samples. Returns {old slot: new slot}."""
        moves: dict[int, int] = {}
        occupied = sorted(slots, reverse=True)
        for new in sorted(self._free):
            if not occupied or occupied[0] < new:
                break
            old = occupied.pop(0)
            self.move(old, new)
            moves[old] = new
        if moves:
            kept = (set(slots) - set(moves)) | set(moves.values())
            self._free = sorted(set(range(self.n_slots)) - kept)  # a sorted list is a valid heap
        return moves

    def move(self, old: int, new: int) -> None:
        """Sample `old`'s entries into the free slot `new`."""
        end = self.lengths[old]
        self.k[:, new, :, :end] = self.k[:, old, :, :end]
        self.v[:, new, :, :end] = self.v[:, old, :, :end]
        self.lengths[new] = end

    def starts(self, slots: list[int], counts: list[int]) -> list[int]:
        """Where each sample's new entries go; refused past max_len."""
        starts = [self.lengths[s] for s in slots]
        if max(s + c for s, c in zip(starts, counts, strict=True)) > self.max_len:
            raise InvalidRequestError("a sample would grow past the cache's max_len")
        return starts

    def plan(self, slots: list[int], counts: list[int]) -> Layout:
        """Lay out one forward in which sample i (in `slots[i]`) appends `counts[i]` new tokens after its cache."""
        return Layout.build(slots, self.starts(slots, counts), counts).to(self.k.device)

    def pad(self, inputs: list[list[int]]) -> list[list[int]]:
        """The tokens each sample feeds in one forward: its own, unpadded."""
        return inputs

    def advance(self, slots: list[int], counts: list[int]) -> None:
        """Record that these samples keep `counts` more entries (accepted tokens only)."""
        for s, c in zip(slots, counts, strict=True):
            self.lengths[s] += c

    def keep(self, slots: list[int], gained: list[int]) -> None:
        """After a decode step: each sample keeps its input token and its accepted drafts."""
        self.advance(slots, gained)


class PaddedKVCache(KVCache):
    """The vanilla layout EMS-SD is measured against: a step feeds every sample as many tokens as the longest
    input, and every cache grows by the batch's largest gain, the entries a sample did not keep staying behind
    as masked pads. No prefix is ever copied in (`Engine` shares prefixes only unpadded)."""

    def __init__(self, n_layers: int, n_slots: int, *args, **kwargs):
        super().__init__(n_layers, n_slots, *args, **kwargs)
        self.positions = [0] * n_slots  # the position of the next token; a cache index is not one
        self.valid = torch.zeros(n_slots, self.max_len, dtype=torch.bool)

    def allocate(self) -> int:
        slot = super().allocate()
        self.positions[slot] = 0
        self.valid[slot] = False
        return slot

    def grow(self, n_slots: int, max_len: int) -> None:
        old_slots, old_len = self.n_slots, self.max_len
        super().grow(n_slots, max_len)
        self.positions += [0] * (n_slots - old_slots)
        valid = torch.zeros(n_slots, max_len, dtype=torch.bool)
        valid[:old_slots, :old_len] = self.valid
        self.valid = valid

    def load_prefix(self, dest: int, k: Tensor, v: Tensor, n: int) -> None:
        raise InvalidRequestError("a padded cache takes no prefix")

    def move(self, old: int, new: int) -> None:
        super().move(old, new)
        self.positions[new] = self.positions[old]
        self.valid[new] = self.valid[old]

    def plan(self, slots: list[int], counts: list[int]) -> Layout:
        starts = self.starts(slots, counts)
        for s, start, c in zip(slots, starts, counts, strict=True):
            self.valid[s, start : start + c] = True
        positions = [self.positions[s] for s in slots]
        return Layout.build(slots, starts, counts, positions, self.valid).to(self.k.device)

    def pad(self, inputs: list[list[int]]) -> list[list[int]]:
        """Every sample's input padded to the longest with its own last token."""
        n = max(map(len, inputs))
        return [x + x[-1:] * (n - len(x)) for x in inputs]

    def advance(self, slots: list[int], counts: list[int]) -> None:
        for s, c in zip(slots, counts, strict=True):
            self.positions[s] += c
        super().advance(slots, counts)

    def keep(self, slots: list[int], gained: list[int]) -> None:
        """Every cache grows by the batch's largest gain; past a sample's own gain the entries are masked pads."""
        grow = max(gained)
        for s, c in zip(slots, gained, strict=True):
            self.positions[s] += c
            self.valid[s, self.lengths[s] + c : self.lengths[s] + grow] = False
            self.lengths[s] += grow


@dataclass
class Layout:
    """The attention layout of one forward over a flat ragged token sequence (EMS-SD's "unpad input tokens").

    The new tokens of all samples are one flat sequence [T]; matmuls run over it as is. Attention either runs on
    the flat tokens directly (`kernels.attend`: token t sees its slot's entries 0..index[t]) or, in PyTorch, scatters
    the queries into rows = cache slots, n = the most new tokens of any sample, with a mask, so that a query sees
    its own slot's keys up to its own position (its cache plus its sample's earlier new tokens: causal). The mask
    and what else attention derives from a step are built once per step, on first use.
    """

    pos: Tensor  # [T] position of each token (for RoPE)
    index: Tensor  # [T] index of each token's entry in its slot; the position itself unless padded
    slot: Tensor  # [T] cache slot of each token
    dest: Tensor | None  # [T] index of each token in the [rows * n] attention layout; None when the identity
    qindex: Tensor  # [rows, n] cache index of each query of that layout (0 where none)
    kv_len: int  # entries any query sees at most
    valid: Tensor | None = None  # [rows, kv_len] entries that are real (padded baseline); None: all up to the index
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        slots: list[int],
        starts: list[int],
        counts: list[int],
        positions: list[int] | None = None,
        valid: Tensor | None = None,
    ) -> Layout:
        """Sample i appends counts[i] entries at index starts[i] of slot slots[i]; its tokens sit at positions
        positions[i].. (default: the indices). `valid` [slots, max_len] masks out pad entries (padded baseline)."""
        if not slots or min(counts) < 1:
            raise InvalidRequestError("a step needs at least one sample with at least one new token")
        n, rows = max(counts), max(slots) + 1
        counts_t = torch.tensor(counts)
        sample = torch.repeat_interleave(torch.arange(len(slots)), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        offset = torch.arange(int(counts_t.sum())) - first[sample]
        index = torch.tensor(starts)[sample] + offset
        pos = index if positions is None else torch.tensor(positions)[sample] + offset
        slot = torch.tensor(slots)[sample]
        dense = slots == list(range(rows)) and all(c == n for c in counts)
        qindex = torch.zeros(rows, n, dtype=torch.long)  # rows/queries that do not exist see entry 0 only
        qindex[slot, offset] = index
        kv_len = max(s + c for s, c in zip(starts, counts, strict=True))
        return cls(
            pos=pos,
            index=index,
            slot=slot,
            dest=None if dense else slot * n + offset,
            qindex=qindex,
            kv_len=kv_len,
            valid=None if valid is None else valid[:rows, :kv_len].clone(),
        )

    @property
    def padded(self) -> bool:
        return self.valid is not None

    @property
    def mask(self) -> Tensor:
        """[rows, 1, n, kv_len] bool: query (row, i) may attend key j."""
        if "mask" not in self.memo:
            mask = torch.arange(self.kv_len, device=self.qindex.device) <= self.qindex[:, None, :, None]
            if self.valid is not None:
                mask &= self.valid[:, None, None, :]
                mask[:, :, :, 0] |= ~mask.any(-1)  # a query of a row with no sample still needs one key
            self.memo["mask"] = mask
        return self.memo["mask"]

    def attention_mask(self, group: int, dtype: torch.dtype) -> Tensor:
        """The mask as SDPA takes it fastest: additive (0 / -inf), repeated for the `group` query heads that share
        a KV head, which attention folds into one query axis: [rows, 1, group * n, kv_len]."""
        key = ("additive", group, dtype)
        if key not in self.memo:
            additive = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self.memo[key] = additive.masked_fill_(~self.mask, float("-inf")).repeat(1, 1, group, 1)
        return self.memo[key]

    def rope(self, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin at each token's position, [T, 1, head_dim] in `dtype`, from the full tables."""
        key = ("rope", dtype)
        if key not in self.memo:
            pos = self.pos.clamp(max=cos.shape[0] - 1)  # a padded layout's pad rows may run past the context
            self.memo[key] = (cos[pos].to(dtype).unsqueeze(1), sin[pos].to(dtype).unsqueeze(1))
        return self.memo[key]

    def to(self, device: torch.device) -> Layout:
        if device.type == "cpu":
            return self
        fields = ("pos", "index", "slot", "dest", "qindex", "valid")
        move = {name: None if getattr(self, name) is None else getattr(self, name).to(device) for name in fields}
        return Layout(**move, kv_len=self.kv_len)


class PrefixStore:
    """The cache entries of finished samples, kept for later prompts that begin the same way: a search asks many
    questions about one text (MCTSr critiques, refines and grades the same problem and answer; a conversation goes
    on where the last reply ended), so most of a new prompt was often computed by an earlier request. Entries are
    copies (the slots go back to work at once), kept least-recently-used first within `budget_bytes`. A sample
    that adds fewer than `min_new` tokens to what an entry holds (the n short grades of one grading prompt) is not
    kept: that entry serves its prompts as well."""

    def __init__(self, budget_bytes: int, min_new: int = 16):
        self.budget, self.bytes, self.min_new = budget_bytes, 0, min_new
        self.entries: OrderedDict[int, tuple[list[int], Tensor, Tensor]] = OrderedDict()
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, tokens: list[int], cache: KVCache, slot: int) -> None:
        """Keep the entries of `slot`, which hold `tokens` (a prompt and what was generated after it; the cache
        may hold fewer than all of them). An entry whose tokens start the new ones is superseded."""
        n = min(len(tokens), cache.lengths[slot])
        k, v = cache.k[:, slot, :, :n], cache.v[:, slot, :, :n]
        size = 2 * k.numel() * k.element_size()
        if n < self.min_new or size > self.budget:  # too short to be matched, or too big to keep
            return
        tokens = tokens[:n]
        shared = {key: common_prefix(tokens, held, n) for key, (held, *_) in self.entries.items()}
        near = [key for key, m in shared.items() if n - m < self.min_new and m < len(self.entries[key][0])]
        if near:
            self.entries.move_to_end(near[0])
            return
        for key, m in shared.items():
            if m == len(self.entries[key][0]):
                self._drop(key)
        while self.bytes + size > self.budget:
            self._drop(next(iter(self.entries)))
        self.entries[next(self._keys)] = (tokens, k.clone(), v.clone())
        self.bytes += size

    def _drop(self, key: int) -> None:
        _, k, v = self.entries.pop(key)
        self.bytes -= 2 * k.numel() * k.element_size()

    def match(self, prompt: list[int], limit: int) -> tuple[int | None, int]:
        """The entry sharing the most leading tokens with `prompt` (at most `limit`), and how many."""
        best, shared = None, 0
        for key, (tokens, *_) in self.entries.items():
            n = common_prefix(prompt, tokens, limit)
            if n > shared:
                best, shared = key, n
        return best, shared

    def load(self, key: int, cache: KVCache, slot: int, n: int) -> None:
        """Give the empty `slot` the entry's first n entries; the entry becomes the most recently used."""
        _, k, v = self.entries[key]
        self.entries.move_to_end(key)
        cache.load_prefix(slot, k, v, n)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`; compared in slices (C speed), then token by token."""
    end, n, chunk = min(limit, len(a), len(b)), 0, 64
    while n + chunk <= end and a[n : n + chunk] == b[n : n + chunk]:
        n += chunk
    while n < end and a[n] == b[n]:
        n += 1
    return n


def share_prefixes(
    prompts: list[list[int]], min_shared: int, known: Sequence[int] | None = None
) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Which prompts compute their own prefix (leaders) and which copy a shared prefix from a leader: {follower:
    (leader, shared tokens)}, each prompt taking the earlier leader it shares most with, if at least `min_shared`
    tokens and more than the `known[i]` tokens it can have elsewhere (the prefix store); a follower keeps at least
    its last token to compute. None when `min_shared` is 0."""
    if min_shared <= 0:
        return list(range(len(prompts))), {}
    leaders: list[int] = []
    followers: dict[int, tuple[int, int]] = {}
    for i, prompt in enumerate(prompts):
        best, shared = -1, 0
        for j in leaders:
            n = common_prefix(prompt, prompts[j], len(prompt) - 1)
            if n > shared:
                best, shared = j, n
        if shared >= min_shared and shared > (known[i] if known else 0):
            followers[i] = (best, shared)
        else:
            leaders.append(i)
    return leaders, followers
