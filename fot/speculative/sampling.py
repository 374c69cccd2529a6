"""Turning logits into tokens: greedy, or temperature / top-k / top-p sampling with a per-request generator."""

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


def next_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """One token per row of logits [B, V]: argmax for greedy rows, a draw from `probabilities` for the others."""
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.temperature > 0:
            tokens[i] = torch.multinomial(probabilities(logits[i], p), 1, generator=generators[i])[0]
    return tokens
