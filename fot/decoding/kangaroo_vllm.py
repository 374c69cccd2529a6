"""Kangaroo as a vLLM speculative proposer: vLLM's `custom_class` method loads this class by its path.

    VLLMBackend(speculative_config=KANGAROO_VLLM)          # or, for `vllm serve`:
    --speculative-config '{"method": "custom_class", "model": "fot.decoding.kangaroo_vllm.KangarooProposer",
                           "num_speculative_tokens": 6}'

vLLM hands the proposer the token ids of every running request and verifies its drafts with the full model (its
own rejection sampler: lossless). The proposer drafts with the model's own first k layers + the trained adapter +
the model's head (the same `KangarooDrafter` as the native engine), keeping its own small KV cache for those k
layers and the adapter, one row per vLLM batch row: each call feeds only the tokens a row has gained since the
last call (the accepted drafts' entries are reused), and a row whose context changed is recomputed from where it
differs. vLLM's verification runs all layers (vLLM exposes no shallow hidden states to a proposer), so the
shallow-work reuse of the native engine does not carry over. The adapter folder comes from `FOT_KANGAROO_ADAPTER`
(default: the adapter shipped for the embedded model).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fot.speculative.cache import KVCache
from fot.speculative.kangaroo import default_adapter_dir, load_adapter
from fot.speculative.model import Transformer, pack_linears

ADAPTER_ENV = "FOT_KANGAROO_ADAPTER"
KANGAROO_VLLM = {
    "method": "custom_class",
    "model": "fot.decoding.kangaroo_vllm.KangarooProposer",
    "num_speculative_tokens": 6,
}


class KangarooProposer:
    START_LEN = 256  # cache positions at first; the cache grows as rows and contexts need

    def __init__(self, vllm_config):
        spec, model_config = vllm_config.speculative_config, vllm_config.model_config
        dtype = model_config.dtype
        model = Transformer.from_pretrained(model_config.model, dtype)
        folder = os.environ.get(ADAPTER_ENV) or default_adapter_dir(model)
        kg = load_adapter(folder, model, max_steps=spec.num_speculative_tokens)
        model.layers = model.layers[: kg.exit_layer]  # only the shallow layers ever run here
        pack_linears(model)
        pack_linears(kg.adapter)
        kg.layer = kg.exit_layer  # in this cache the adapter's KV comes right after the shallow layers
        self.kangaroo, self.max_len = kg, model_config.max_model_len
        self.max_rows, a = vllm_config.scheduler_config.max_num_seqs, model.args
        length = min(self.START_LEN, self.max_len)
        self.cache = KVCache(kg.exit_layer + 1, 1, a.n_kv_heads, length, a.head_dim, dtype)
        self.seen: dict[int, list[int]] = {}  # row -> the tokens whose entries fill that row of the cache

    def fit(self, rows: int, length: int) -> None:
        """Grow the cache to hold `rows` rows of `length` positions, doubling within vLLM's batch and context: a
        cache of max_num_seqs rows of the whole context, made up front, would take many GiB for a long-context
        model, most of it never used."""
        c = self.cache
        if rows <= c.n_slots and length <= c.max_len:
            return
        grown_rows = c.n_slots if rows <= c.n_slots else min(self.max_rows, max(rows, 2 * c.n_slots))
        grown_len = c.max_len if length <= c.max_len else min(self.max_len, max(length, 2 * c.max_len))
        c.grow(grown_rows, grown_len)

    def load_model(self, *args, **kwargs) -> None:
        """vLLM's model is not needed: the shallow layers were loaded from the same checkpoint."""

    @torch.no_grad()
    def propose(
        self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray, **_
    ) -> list[list[int]]:
        rows, new, starts, caps = [], [], [], []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            if not sampled or n >= self.max_len - 1:
                continue
            context = token_ids_cpu[row, :n].tolist()
            seen = self.seen.get(row, [])
            keep = 0
            for a, b in zip(seen, context, strict=False):
                if a != b:
                    break
                keep += 1
            keep = min(keep, n - 1)  # the last token is always fed: its adapter output gives the first draft
            rows.append(row)
            new.append(context[keep:])
            starts.append(keep)
            caps.append(min(self.kangaroo.max_steps, self.max_len - n - 1))
            self.seen[row] = context
        drafts_out: list[list[int]] = [[] for _ in sampled_token_ids]
        if not rows:
            return drafts_out
        self.fit(max(rows) + 1, max(s + len(t) + c for s, t, c in zip(starts, new, caps, strict=True)))
        drafts, _, _ = self.kangaroo.draft(new, rows, starts, caps, self.cache)
        for row, d in zip(rows, drafts, strict=True):
            drafts_out[row] = d
            self.seen[row] = self.seen[row] + d
        return drafts_out
