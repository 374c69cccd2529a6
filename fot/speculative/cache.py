"""EMS-SD's "unpad KV cache": every sample owns a slot and grows at its own length.

A sample's entry for position p lives at index p of its slot, so nothing is ever padded inside a sample: a sample
that accepted 5 draft tokens and one that accepted 0 both write exactly what they have, at their own offsets.
Rejected entries are dropped by moving the length back (they are overwritten later and never attended, because a
query at position p only sees keys 0..p). A finished sample frees its slot for the next request.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

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
        self.lengths = [0] * n_slots
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
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def plan(self, slots: list[int], counts: list[int]) -> Step:
        """Lay out one forward in which sample i (in `slots[i]`) appends `counts[i]` new tokens after its cache."""
        starts = [self.lengths[s] for s in slots]
        if max(s + c for s, c in zip(starts, counts, strict=True)) > self.max_len:
            raise InvalidRequestError("a sample would grow past the cache's max_len")
        return Step.build(slots, starts, counts).to(self.k.device)

    def advance(self, slots: list[int], counts: list[int]) -> None:
        """Record that these samples now keep `counts` more entries (accepted tokens only)."""
        for s, c in zip(slots, counts, strict=True):
            self.lengths[s] += c


@dataclass
class Step:
    """The attention layout of one forward over a flat ragged token sequence (EMS-SD's "unpad input tokens").

    The new tokens of all samples are one flat sequence [T]; matmuls run over it as is. For attention only, the
    queries are scattered into rows = cache slots, n = the most new tokens of any sample, so that a query sees its
    own slot's keys up to its own position (its cache plus its sample's earlier new tokens: causal).
    """

    pos: Tensor  # [T] position of each token, which is also its index in its slot
    slot: Tensor  # [T] cache slot of each token
    dest: Tensor | None  # [T] index of each token in the [rows * n] attention layout; None when the identity
    mask: Tensor  # [rows, 1, n, kv_len] bool: query (row, i) may attend key j

    @classmethod
    def build(cls, slots: list[int], starts: list[int], counts: list[int]) -> Step:
        if not slots or min(counts) < 1:
            raise InvalidRequestError("a step needs at least one sample with at least one new token")
        n, rows = max(counts), max(slots) + 1
        counts_t = torch.tensor(counts)
        sample = torch.repeat_interleave(torch.arange(len(slots)), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        offset = torch.arange(int(counts_t.sum())) - first[sample]
        pos = torch.tensor(starts)[sample] + offset
        slot = torch.tensor(slots)[sample]
        dense = slots == list(range(rows)) and all(c == n for c in counts)
        qpos = torch.zeros(rows, n, dtype=torch.long)  # rows/queries that do not exist see key 0 only
        qpos[slot, offset] = pos
        kv_len = max(s + c for s, c in zip(starts, counts, strict=True))
        mask = torch.arange(kv_len) <= qpos[:, None, :, None]
        return cls(pos=pos, slot=slot, dest=None if dense else slot * n + offset, mask=mask)

    def to(self, device: torch.device) -> Step:
        if device.type == "cpu":
            return self
        dest = None if self.dest is None else self.dest.to(device)
        return Step(pos=self.pos.to(device), slot=self.slot.to(device), dest=dest, mask=self.mask.to(device))
