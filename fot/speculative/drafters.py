"""Drafters propose tokens that the target model then verifies (see verify.py). A drafter only has to be fast and
often right: whatever it proposes, the output stays exactly the target model's.

The interface is one call per engine step for the whole batch, so a drafter can batch its own work: given each
sample's context (prompt + generated tokens) and how many tokens it may propose (0 allowed), return the drafts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Drafter(Protocol):
    def propose(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> list[list[int]]:
        """At most limits[i] draft tokens to follow contexts[i], for every sample i."""
        ...


class PromptLookup:
    """LLMA / prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from `max_ngram`
    down to `min_ngram`) and propose the tokens that followed it. Free to run and very good when the output copies
    its input, as MCTSr's "refine" answers do."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> list[list[int]]:
        return [self.lookup(np.asarray(ctx), k) if k > 0 else [] for ctx, k in zip(contexts, limits, strict=True)]

    def lookup(self, ctx: np.ndarray, k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(ctx[:-1], n)  # every earlier n-gram, not the suffix itself
            hits = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ctx[start : start + k].tolist()
        return []


def draft_lengths(
    rates: Sequence[float],
    caps: Sequence[int],
    threshold: float,
    budget: int | None = None,
    cost: Callable[[int], float] | None = None,
    passes: PassCost | None = None,
) -> list[int]:
    """How many tokens each sample drafts this step. Draft token j of sample i survives verification with
    probability about v = rates[i] ** j; tokens with v < `threshold` are not drafted, and at most `budget` of the
    likeliest are. Verifying a token costs compute even when it is rejected (much, once a batch is compute-bound,
    as on CPU), so with `cost` (seconds of a verification forward over T tokens) the likeliest n tokens are kept,
    n chosen to maximise the expected throughput (B + sum of their v) / step time of a batch of B samples. The step
    time is cost(B + n), plus, with `passes`, the draft passes of the samples it flags: one pass per draft depth
    over the samples drafting that deep (Kangaroo's shallow layers), and the pass over all B that every step runs."""
    wanted = []
    for i, (rate, cap) in enumerate(zip(rates, caps, strict=True)):
        value = 1.0
        for _ in range(cap):
            value *= rate
            if value < threshold:
                break
            wanted.append((value, i))
    wanted.sort(reverse=True)
    if budget is not None:
        wanted = wanted[:budget]
    if cost is not None:
        batch = len(caps)
        passes = passes or PassCost(lambda rows: 0.0, [False] * batch)
        depth, rows = [0] * batch, Counter[int]()  # rows[d]: the flagged samples drafting at least d tokens
        drafting = passes.seconds(batch)
        best, gain, best_rate = 0, float(batch), batch / (cost(batch) + drafting)
        for n, (value, i) in enumerate(wanted, 1):
            gain += value
            depth[i] += 1
            if passes.samples[i]:
                r = rows[depth[i]] = rows[depth[i]] + 1
                drafting += passes.seconds(r) - (passes.seconds(r - 1) if r > 1 else 0.0)
            rate = gain / (cost(batch + n) + drafting)
            if rate > best_rate:
                best, best_rate = n, rate
        wanted = wanted[:best]
    lengths = [0] * len(caps)
    for _, i in wanted:
        lengths[i] += 1
    return lengths


@dataclass
class PassCost:
    """What a drafter that runs the model's layers per draft token (Kangaroo) adds to a step: `seconds(rows)` of
    one draft pass over that many samples, and which samples draft that way (`samples`, a flag each)."""

    seconds: Callable[[int], float]
    samples: Sequence[bool]


class ForwardCost:
    """Verification-forward time by token count T on this machine: a moving average per count seen, and linear
    interpolation between counts (extrapolation past them; below the smallest, its cost), so that drafting can
    weigh a draft token's chance against what verifying it costs here. No straight line fits: while a forward reads
    its weights once, a few tokens cost about what one does, and past that each token adds its compute."""

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self.seconds: dict[int, float] = {}

    def record(self, tokens: int, seconds: float) -> None:
        old = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def known(self, tokens: int) -> bool:
        return tokens in self.seconds

    def __call__(self, tokens: int) -> float:
        """Estimated seconds of a forward over `tokens` tokens (past the smallest count seen, needs two)."""
        if tokens in self.seconds:
            return self.seconds[tokens]
        counts = sorted(self.seconds)
        if counts and tokens < counts[0]:  # fewer tokens still read every weight
            return self.seconds[counts[0]]
        if len(counts) < 2:
            raise ValueError("the cost of a forward past the smallest count needs two token counts measured")
        right = next((i for i, c in enumerate(counts) if c > tokens), len(counts) - 1)
        lo, hi = counts[right - 1], counts[right]
        slope = max((self.seconds[hi] - self.seconds[lo]) / (hi - lo), 0.0)
        return self.seconds[lo] + slope * (tokens - lo)
