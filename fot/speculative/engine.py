"""The native engine: continuous batching over a per-sample KV cache, read top to bottom in `generate`.

Each loop: admit waiting requests into free cache slots and prefill all of them in ONE flat forward (no pad token
anywhere), drop the samples that finished, then decode one token for every running sample in one forward. A
sample that finishes frees its slot at once, so a long sample never holds a short one back.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from torch import Tensor
from tqdm.auto import tqdm

from fot.config import SamplingParams
from fot.errors import InvalidRequestError
from fot.speculative.cache import KVCache
from fot.speculative.model import Transformer
from fot.speculative.sampling import next_tokens

ChatMessage = dict[str, str]
Prompt = str | list[ChatMessage] | list[int]


class Generation(BaseModel):
    """One finished request."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    forward_passes: int
    logprobs: list[float] | None = None  # of each generated token, under the model's unscaled distribution

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


@dataclass
class EngineStats:
    """Counters over the engine's lifetime; every backend reports the same ones."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0


@dataclass
class _Sequence:
    """A request in flight (plain Python state; tensors live in the cache)."""

    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = -1
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forward_passes: int = 0
    finish: Literal["stop", "length"] | None = None
    text: str | None = None


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls only pay off with native instructions (AVX512-BF16 or AMX); on AVX2 they are emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_has_fast_bf16() else torch.float32
    named = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in named:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    return named[dtype]


class Engine:
    """Batched generation with the native model. `pack=True` (the default) runs the matmuls on oneDNN-packed
    weights on CPU."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = 32,
        pack: bool = True,
        seed: int = 0,
    ):
        if max_batch < 1:
            raise InvalidRequestError("max_batch must be >= 1")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = model.output.weight.device
        self.context = model.args.max_seq_len
        self.eos_ids = set(eos_ids) | ({tokenizer.eos_token_id} - {None})
        self.stats = EngineStats()
        self.rng = torch.Generator(self.device).manual_seed(seed)
        if pack:
            model.pack_weights()

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "default", *, dtype: str | torch.dtype = "auto", device: str = "cpu", **kw
    ) -> Engine:
        from transformers import AutoTokenizer

        from fot.models import resolve_model

        folder = resolve_model(model)
        net = Transformer.from_pretrained(folder, resolve_dtype(dtype, device)).to(device)
        return cls(net, AutoTokenizer.from_pretrained(folder), eos_ids=read_eos(folder), **kw)

    # ---- requests -------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Text is tokenized as is; chat messages get the model's chat template; token ids pass through."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequestError("chat messages given but the tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < self.model.args.vocab_size for t in prompt):
            return list(prompt)
        raise InvalidRequestError(
            f"a prompt must be text, chat messages or in-vocabulary token ids, got {prompt!r:.80}"
        )

    def _sequences(self, prompts: Sequence[Prompt], params) -> list[_Sequence]:
        """Validate and tokenize everything before any work, so bad input fails fast and alone."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise InvalidRequestError("prompts must be a non-empty list")
        if isinstance(params, Sequence) and not isinstance(params, str | dict):
            if len(params) != len(prompts):
                raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
            all_params = [SamplingParams.make(p) for p in params]
        else:
            all_params = [SamplingParams.make(params)] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, all_params, strict=True)):
            ids = self.tokenize(prompt)
            if not ids:
                raise InvalidRequestError(f"prompt {i} is empty")
            if len(ids) + p.max_tokens > self.context:
                raise InvalidRequestError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_tokens {p.max_tokens} exceed the context of "
                    f"{self.context} tokens"
                )
            gen = torch.Generator(self.device).manual_seed(p.seed) if p.seed is not None else self.rng
            seqs.append(_Sequence(index=i, prompt=ids, params=p, generator=gen))
        return seqs

    # ---- the loop -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        *,
        progress: bool = False,
    ) -> list[Generation]:
        """Generate a completion for every prompt (order preserved); `params` is one for all or one per prompt."""
        seqs = self._sequences(prompts, params)
        cache = self.new_cache(seqs)
        waiting, running = deque(seqs), []
        bar = tqdm(total=len(seqs), desc="generate", unit="req", disable=not progress)
        while waiting or running:
            admitted = []
            while waiting and cache.n_free:
                seq = waiting.popleft()
                seq.slot = cache.allocate()
                admitted.append(seq)
            if admitted:
                self.prefill(admitted, cache)
                running += admitted
            running = self.retire(running, cache, bar)
            if running:
                self.decode(running, cache)
                running = self.retire(running, cache, bar)
        bar.close()
        self.stats.requests += len(seqs)
        return [self.result(s) for s in seqs]

    def new_cache(self, seqs: list[_Sequence]) -> KVCache:
        a = self.model.args
        max_len = max(len(s.prompt) + s.params.max_tokens for s in seqs)
        n_slots = min(self.max_batch, len(seqs))
        return KVCache(a.n_layers, n_slots, a.n_kv_heads, max_len, a.head_dim, self.model.dtype, device=self.device)

    def prefill(self, seqs: list[_Sequence], cache: KVCache) -> None:
        """All new prompts in one flat forward; logits only at each prompt's last token."""
        counts = [len(s.prompt) for s in seqs]
        tokens = torch.tensor([t for s in seqs for t in s.prompt], device=self.device)
        last = torch.tensor(counts, device=self.device).cumsum(0) - 1
        self.run(seqs, cache, tokens, counts, last)
        self.stats.prompt_tokens += sum(counts)

    def decode(self, seqs: list[_Sequence], cache: KVCache) -> None:
        tokens = torch.tensor([s.out[-1] for s in seqs], device=self.device)
        self.run(seqs, cache, tokens, [1] * len(seqs), None)

    def run(self, seqs: list[_Sequence], cache: KVCache, tokens: Tensor, counts: list[int], rows: Tensor | None):
        slots = [s.slot for s in seqs]
        step = cache.plan(slots, counts)
        logits = self.model(tokens, step, cache, rows)
        cache.advance(slots, counts)
        self.stats.forward_passes += 1
        self.append(seqs, logits)

    def append(self, seqs: list[_Sequence], logits: Tensor) -> None:
        """Pick each sample's next token and decide whether it is done."""
        chosen = next_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        logprobs = None
        if any(s.params.logprobs for s in seqs):
            logprobs = torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0].tolist()
        for i, (seq, token) in enumerate(zip(seqs, chosen.tolist(), strict=True)):
            seq.out.append(token)
            seq.forward_passes += 1
            if seq.params.logprobs:
                seq.logprobs.append(logprobs[i])
            self.check_finished(seq)

    def check_finished(self, seq: _Sequence) -> None:
        p = seq.params
        if not p.ignore_eos and seq.out[-1] in self.eos_ids:
            seq.finish = "stop"
        elif p.stop:
            text = self.tokenizer.decode(seq.out, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                seq.finish, seq.text = "stop", text[: min(hits)]
        if seq.finish is None and len(seq.out) >= p.max_tokens:
            seq.finish = "length"

    def retire(self, running: list[_Sequence], cache: KVCache, bar: tqdm) -> list[_Sequence]:
        still = []
        for seq in running:
            if seq.finish is None:
                still.append(seq)
            else:
                cache.release(seq.slot)
                self.stats.generated_tokens += len(seq.out)
                bar.update(1)
        return still

    def result(self, seq: _Sequence) -> Generation:
        text = seq.text if seq.text is not None else self.tokenizer.decode(seq.out, skip_special_tokens=True)
        return Generation(
            text=text,
            token_ids=seq.out,
            finish_reason=seq.finish,
            prompt_tokens=len(seq.prompt),
            forward_passes=seq.forward_passes,
            logprobs=seq.logprobs if seq.params.logprobs else None,
        )


def read_eos(folder: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (an int or a list), if present."""
    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
