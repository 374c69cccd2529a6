"""Accepting draft tokens so that speculative output is exactly what plain decoding would produce.

Greedy: keep the drafts while they equal the argmax, then take the argmax where they stopped (one token is always
gained). Sampling: rejection sampling (Leviathan et al., 2023). Our drafters are deterministic, so the draft
distribution q is a point mass on the draft token x: accept x with probability min(1, p(x) / q(x)) = p(x); on a
rejection draw from the residual max(0, p - q), which is p with x removed. Either way each emitted token follows p.
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


def accept_greedy(argmax: list[int], draft: list[int]) -> list[int]:
    """argmax[j] is the model's choice after the j-th input token (the last accepted one, then the drafts)."""
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return draft[:n] + [argmax[n]]


def accept_sampled(
    logits: Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """logits [len(draft) + 1, V]: the target's logits after each input token. Returns the accepted drafts plus one
    token drawn from the residual (on a rejection) or from the last row (when every draft was accepted)."""
    for j, x in enumerate(draft):
        p = probabilities(logits[j], params)
        if torch.rand((), generator=generator, device=p.device) < p[x]:
            continue
        p[x] = 0.0
        return draft[:j] + [int(torch.multinomial(p / p.sum(), 1, generator=generator))]
    last = probabilities(logits[len(draft)], params)
    return draft + [int(torch.multinomial(last, 1, generator=generator))]
