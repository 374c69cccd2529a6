"""Accepting draft tokens so that speculative output is exactly what plain decoding would produce.

Greedy: keep the drafts while they equal the argmax, then take the argmax where they stopped (one token is always
gained). Sampling: speculative sampling (Leviathan et al., 2023) with a deterministic drafter, whose draft
distribution q is a point mass on the draft token x: x must be kept with probability p(x), and on a rejection the
token comes from the residual max(0, p - q), which is p with x removed. We draw it by coupling: the token at output
position t is F^-1(u_t), p's inverse CDF at a uniform u_t that depends only on the sample's seed and t, and x is
kept exactly when that token is x. Kept with probability p(x), and otherwise distributed as p without x, as the
rule requires; and since plain decoding draws F^-1(u_t) too, sampled output is plain output token for token,
whatever was drafted (given the same logits, which the CPU kernels make batch-invariant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fot.config import SamplingParams


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampling draws from ([..., V], fp32): temperature, then top-k, then top-p (nucleus)."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


MASK = (1 << 64) - 1


def uniform(seed: int, position: int) -> float:
    """The sample's uniform in [0, 1) for output position `position` (SplitMix64 of both): a pure function, so
    the draw does not depend on how many drafts were verified before it or on what else the batch held."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def draw(p: Tensor, u: float) -> int:
    """The token at p's inverse CDF at u (never one of probability 0)."""
    cdf = p.cumsum(-1)
    i = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    return i if i < p.shape[-1] else int(p.nonzero()[-1])  # u * total rounded up to the total: the last possible


def accept_greedy(argmax: list[int], draft: list[int]) -> list[int]:
    """argmax[j] is the model's choice after the j-th input token (the last accepted one, then the drafts)."""
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return draft[:n] + [argmax[n]]


def accept_sampled(logits: Tensor, draft: list[int], params: SamplingParams, seed: int, position: int) -> list[int]:
    """logits [len(draft) + 1, V]: the target's logits after each input token, whose first row decides output
    position `position`. Returns the drafts kept plus the token drawn where the first one was not (or after the
    last row, when every draft was kept)."""
    for j, x in enumerate(draft):
        token = draw(probabilities(logits[j], params), uniform(seed, position + j))
        if token != x:
            return draft[:j] + [token]
    return draft + [draw(probabilities(logits[len(draft)], params), uniform(seed, position + len(draft)))]
