"""The native engine: continuous batching over a per-sample KV cache, read top to bottom in `generate`.

Each loop: admit waiting requests into free cache slots and prefill all of them in ONE flat forward (no pad token
anywhere), drop the samples that finished, then decode every running sample in one forward. A sample that finishes
frees its slot at once, so a long sample never holds a short one back.

With a drafter this is EMS-SD (multi-sample speculative decoding without padding): each sample's last token and its
drafts (any number, 0 allowed) are concatenated with every other sample's into one flat input, verified in one
forward, and each sample keeps exactly the entries it accepted, at its own offset in its own cache slot. Every
drafter (prompt lookup, Kangaroo, the hybrid of both, none) sits behind one interface,
`fot.speculative.proposer.Proposer`: the engine asks it for the prompt forward, the drafts and the verification.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from torch import Tensor
from tqdm.auto import tqdm

from fot.config import SamplingParams, SpeculativeConfig
from fot.errors import InvalidRequestError
from fot.speculative import kernels
from fot.speculative.cache import KVCache, PrefixStore, common_prefix
from fot.speculative.drafters import Drafter, PromptLookup, draft_lengths
from fot.speculative.hybrid import Hybrid
from fot.speculative.kangaroo import default_adapter_dir, load_adapter
from fot.speculative.model import Transformer
from fot.speculative.proposer import Batch, Proposal, Proposer, TokenProposer
from fot.speculative.verify import accept_greedy, accept_sampled
from fot.tasks.base import check_unicode

ChatMessage = dict[str, str]
Prompt = str | list[ChatMessage] | list[int]


class Generation(BaseModel):
    """One finished request."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    forward_passes: int  # that this request took part in (its prefill included)
    draft_tokens: int = 0  # proposed by the drafter
    accepted_tokens: int = 0  # drafts that verification kept
    logprobs: list[float] | None = None  # of each generated token, under the model's unscaled distribution

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def accept_length(self) -> float:
        """Tokens gained per decoding step after the prefill (1.0 without speculation)."""
        steps = self.forward_passes - 1
        return 1.0 + self.accepted_tokens / steps if steps else 1.0

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


@dataclass
class EngineStats:
    """Usage counters (every backend reports the same ones): `Engine.stats` over the engine's lifetime,
    `Engine.last_stats` for the last `generate` call (one batch)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    decode_steps: int = 0  # (sample, decode forward) pairs: how often some sample was advanced after its prefill
    draft_tokens: int = 0
    accepted_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose cache entries were copied (an earlier prompt, the store)
    cancelled: int = 0  # samples dropped before they finished (their caller went away)
    prefill_seconds: float = 0.0  # wall time in prefill forwards, and in everything else (decode, draft, verify)
    decode_seconds: float = 0.0
    source_drafts: dict[str, int] = field(default_factory=dict)  # draft tokens by the drafter that made them
    source_accepted: dict[str, int] = field(default_factory=dict)  # (the hybrid has two: "lookup", "kangaroo")

    @property
    def accept_length(self) -> float:
        """Mean tokens gained per sample per decoding step (EMS-SD's and Kangaroo's "accepted length")."""
        return 1.0 + self.accepted_tokens / self.decode_steps if self.decode_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def snapshot(self) -> EngineStats:
        """A copy of the counters now, for `since` (the per-source counts copied too, not shared)."""
        return replace(self, source_drafts=dict(self.source_drafts), source_accepted=dict(self.source_accepted))

    def since(self, earlier: EngineStats) -> EngineStats:
        """What was counted after `earlier` (a `snapshot` taken then)."""

        def minus(now, then):
            if isinstance(now, dict):
                return {k: v - then.get(k, 0) for k, v in now.items() if v != then.get(k, 0)}
            return now - then

        return EngineStats(**{name: minus(getattr(self, name), getattr(earlier, name)) for name in vars(self)})


@dataclass
class _Sequence:
    """A request in flight (plain Python state; tensors live in the cache)."""

    index: int
    prompt: list[int]
    params: SamplingParams
    seed: int  # its sampled tokens are a function of this seed and their positions (verify.uniform)
    slot: int = -1
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forward_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # per drafter ("lookup", "kangaroo", ...): decayed counts of accepted drafts and of draft positions tried, the
    # acceptance-rate estimate (the hybrid's two drafters each have their own)
    hits: dict[str, float] = field(default_factory=dict)
    trials: dict[str, float] = field(default_factory=dict)
    finish: Literal["stop", "length"] | None = None
    text: str | None = None


class CostCurve:
    """Seconds by count on this machine (a verification forward by its token count, drafting by its depth): a
    moving average per count seen, and linear interpolation between counts (extrapolation past them), so that
    drafting can weigh a draft token's chance against what it costs here. No straight line fits: while a forward
    reads its weights once, a few tokens cost about what one does, and past that each token adds its compute."""

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self.seconds: dict[int, float] = {}

    def record(self, tokens: int, seconds: float) -> None:
        old = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def known(self, tokens: int) -> bool:
        return tokens in self.seconds

    def __call__(self, tokens: int) -> float:
        """Estimated seconds at count `tokens` (needs two counts seen)."""
        if tokens in self.seconds:
            return self.seconds[tokens]
        counts = sorted(self.seconds)
        if len(counts) < 2:
            raise ValueError("a cost curve needs two counts measured")
        right = next((i for i, c in enumerate(counts) if c > tokens), len(counts) - 1)
        lo, hi = counts[max(right - 1, 0)], counts[max(right, 1)]
        slope = max((self.seconds[hi] - self.seconds[lo]) / (hi - lo), 0.0)
        return max(self.seconds[lo] + slope * (tokens - lo), 0.0)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls only pay off with native instructions (AVX512-BF16 or AMX); on AVX2 they are emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """dtype "auto": bf16 on an accelerator, and on a CPU where our kernels run (AVX512-BF16): there every decoding
    and verification op is batch-invariant, so greedy speculative output is plain output token for token in bf16
    too, at half the weight bytes of fp32. Elsewhere on CPU fp32, the only dtype in which oneDNN's and SDPA's
    rounding cannot part a verification forward from a one-token forward. "fast": bf16 wherever bf16 is fast
    (an accelerator, or a CPU with AVX512-BF16/AMX), kernels or not. The embedded checkpoints are fp32
    de-quantizations of their GGUF: "float32" runs them exactly as they are."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" or kernels.load() is not None else torch.float32
    if dtype == "fast":
        return torch.bfloat16 if device != "cpu" or cpu_has_fast_bf16() else torch.float32
    named = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in named:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, fast, float32 or bfloat16")
    return named[dtype]


class Engine:
    """Batched generation with the native model. `pack=True` (the default) runs the matmuls on oneDNN-packed
    weights on CPU. `speculative` (a `SpeculativeConfig`, a dict, or a method name such as "prompt_lookup")
    switches on EMS-SD; `drafter` (a drafter of token ids) overrides the one the config would build. Prompts
    admitted together that share at least `min_shared_prefix` leading tokens compute that prefix once, and finished
    samples' cache entries are kept (`prefix_cache_mib` of memory, least recently used first) for later prompts that
    begin the same way (`min_shared_prefix=0` switches both off)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = 32,
        pack: bool = True,
        seed: int = 0,
        speculative: SpeculativeConfig | dict | str | None = None,
        drafter: Drafter | None = None,
        min_shared_prefix: int = 16,
        prefix_cache_mib: int = 512,
    ):
        if max_batch < 1:
            raise InvalidRequestError("max_batch must be >= 1")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = model.device
        self.context = model.args.max_seq_len
        self.eos_ids = set(eos_ids) | ({tokenizer.eos_token_id} - {None})
        self.stats, self.last_stats = EngineStats(), EngineStats()
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.cache: KVCache | None = None
        self.rng = torch.Generator().manual_seed(seed)  # draws the seeds of requests that bring none
        self.min_shared_prefix, self.prefix_cache_mib, self.pack = min_shared_prefix, prefix_cache_mib, pack
        if pack:
            model.pack_weights()
        self.set_speculative(speculative, drafter)

    def set_speculative(self, speculative: SpeculativeConfig | dict | str | None, drafter: Drafter | None = None):
        """Switch how the engine drafts (between runs: refused while requests are in flight). The prefix store and
        the cost measurements start afresh: a Kangaroo cache keeps one more layer than a plain one, and
        what one drafter measured or cached must not speed up the next one's run."""
        if not self.idle:
            raise InvalidRequestError("the drafter can change only while the engine runs nothing")
        self.speculative = spec = SpeculativeConfig.make(speculative) or (SpeculativeConfig() if drafter else None)
        self.proposer = make_proposer(self.model, spec, drafter)
        if self.pack:
            self.proposer.pack()
        self.verify_cost = CostCurve()  # a verification forward, by its token count
        self.draft_cost: dict[int, CostCurve] = {}  # by batch size: drafting, by its depth (`Proposal.passes`)
        self.prefix_store = PrefixStore(self.prefix_cache_mib << 20, min_new=max(self.min_shared_prefix, 1))

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "default", *, dtype: str | torch.dtype = "auto", device: str = "cpu", **kw
    ) -> Engine:
        from transformers import AutoTokenizer

        from fot.models import resolve_model

        folder = resolve_model(model)
        pack = kw.get("pack", True) and device == "cpu"  # then each weight is read straight into its packed layout
        net = Transformer.from_pretrained(folder, resolve_dtype(dtype, device), pack=pack)
        net = net if pack else net.to(device)  # a packed model stays on the CPU
        return cls(net, AutoTokenizer.from_pretrained(folder), eos_ids=read_eos(folder), **kw)

    # ---- requests -------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Text is tokenized as is; chat messages get the model's chat template; token ids pass through."""
        if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < self.model.args.vocab_size for t in prompt):
            return list(prompt)
        return encode_prompt(self.tokenizer, prompt)

    def encode_request(self, prompt: Prompt, params: SamplingParams, name: str = "the prompt") -> list[int]:
        """The prompt's token ids, checked: not empty, and room in the context for `params.max_tokens`."""
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError(f"{name} is empty")
        if len(ids) + params.max_tokens > self.context:
            raise InvalidRequestError(
                f"{name}: {len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed the context of "
                f"{self.context} tokens"
            )
        return ids

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
            if p.n != 1:
                raise InvalidRequestError(f"prompt {i}: the engine takes n=1; fot.decoding.NativeBackend serves n > 1")
            ids = self.encode_request(prompt, p, name=f"prompt {i}")
            seed = p.seed if p.seed is not None else int(torch.randint(2**62, (), generator=self.rng))
            seqs.append(_Sequence(index=i, prompt=ids, params=p, seed=seed))
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
        if not self.idle:
            raise InvalidRequestError("the engine is already running requests: drive it from one place")
        start = self.stats.snapshot()
        seqs = self.submit(prompts, params)
        bar = tqdm(total=len(seqs), desc="generate", unit="req", disable=not progress)
        while not self.idle:
            bar.update(len(self.step()))
        bar.close()
        self.last_stats = self.stats.since(start)
        return [self.result(s) for s in seqs]

    def submit(self, prompts: Sequence[Prompt], params=None) -> list[_Sequence]:
        """Validate and queue requests (all or none); `step` runs them, next to whatever already runs."""
        seqs = self._sequences(prompts, params)
        self.stats.requests += len(seqs)
        self.waiting.extend(seqs)
        return seqs

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @torch.no_grad()
    def step(self) -> list[_Sequence]:
        """One turn of continuous batching: admit waiting requests into free cache slots (one prefill forward for
        all of them), then advance every running sample by one forward. Returns the samples that finished. The
        cache's memory goes back when nothing is left to run."""
        try:
            admitted = self.admit()
            if admitted:
                t = time.perf_counter()
                self.prefill(admitted, self.cache)
                self.stats.prefill_seconds += time.perf_counter() - t
                self.running += admitted
            finished = self.retire()
            if self.running and not self.waiting:  # nobody will fill the holes the finished samples left: close them
                moves = self.cache.compact([s.slot for s in self.running])
                for seq in self.running:
                    seq.slot = moves.get(seq.slot, seq.slot)
            if self.running:
                t = time.perf_counter()
                self.decode(self.running, self.cache)
                self.stats.decode_seconds += time.perf_counter() - t
                finished += self.retire()
        except Exception:
            self.abort()
            raise
        if self.idle:
            self.cache = None
        return finished

    def cancel(self, seqs: Sequence[_Sequence]) -> None:
        """Drop these samples, waiting or running, and free their cache slots (a caller that went away, such as
        a disconnected client, must not keep the batch busy); finished samples are left alone."""
        gone = {id(s) for s in seqs if s.finish is None}
        if not gone:
            return
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        for seq in self.running:
            if id(seq) in gone:
                self.cache.release(seq.slot)
        self.running = [s for s in self.running if id(s) not in gone]
        self.stats.cancelled += len(gone)
        if self.idle:
            self.cache = None

    def abort(self) -> None:
        """Drop every request in flight (after a failure: the caller tells their owners)."""
        self.waiting.clear()
        self.running.clear()
        self.cache = None

    def admit(self) -> list[_Sequence]:
        """Waiting requests that fit into free slots, each given one; the cache grows (up to `max_batch` slots,
        and in length) for requests that arrived while others run."""
        if not self.waiting:
            return []
        seqs = [*self.running, *self.waiting]
        # padded: a cache may grow by 1 + num_speculative_tokens entries for every token it keeps
        growth = 1 + self.speculative.num_speculative_tokens if self.padded else 1
        max_len = max(len(s.prompt) + s.params.max_tokens * growth for s in seqs)
        n_slots = min(self.max_batch, len(seqs))
        if self.cache is None:
            a = self.model.args
            layers = a.n_layers + self.proposer.extra_layers  # Kangaroo's adapter keeps its KV as one more layer
            shape = (layers, n_slots, a.n_kv_heads, max_len, a.head_dim)
            self.cache = KVCache(*shape, self.model.dtype, device=self.device, padded=self.padded)
        elif n_slots > self.cache.n_slots or max_len > self.cache.max_len:  # by half at least: copies are rare
            c = self.cache
            c.grow(max(n_slots, min(self.max_batch, c.n_slots * 3 // 2)), max(max_len, c.max_len * 3 // 2))
        admitted = []
        while self.waiting and self.cache.n_free:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            admitted.append(seq)
        return admitted

    @property
    def padded(self) -> bool:
        """Speculation in the paper's padded ("vanilla") layout, the baseline EMS-SD is measured against."""
        return self.speculative is not None and self.speculative.layout == "padded"

    @property
    def reuses_prefixes(self) -> bool:
        """Prompts copy shared prefixes (within an admission and from the prefix store); not in the padded
        baseline, whose caches all advance together."""
        return self.min_shared_prefix > 0 and not self.padded

    def prefill(self, seqs: list[_Sequence], cache: KVCache) -> None:
        """All new prompts in one flat forward; logits only at each prompt's last token. A prompt computes only
        what was not computed before: it copies the longest prefix it shares with a finished sample (the prefix
        store) or with an earlier prompt of the same admission (the n samples of one request, the trees of a
        forest asking about one problem; copied after the first forward, and the rest computed in a second)."""
        prompts = [s.prompt for s in seqs]
        reuse = self.reuses_prefixes
        stored = [self.prefix_store.match(p, len(p) - 1) if reuse else (None, 0) for p in prompts]
        known = [n if n >= self.min_shared_prefix else 0 for _, n in stored]
        leaders, followers = share_prefixes(prompts, self.min_shared_prefix if reuse else 0, known)
        for i in leaders:
            if known[i]:
                self.prefix_store.load(stored[i][0], cache, seqs[i].slot, known[i])
                self.stats.reused_prompt_tokens += known[i]
        self.forward_prompts([seqs[i] for i in leaders], cache, [known[i] for i in leaders])
        if followers:
            for i, (source, shared) in followers.items():
                cache.copy_prefix(seqs[source].slot, seqs[i].slot, shared)
                self.stats.reused_prompt_tokens += shared
            self.forward_prompts([seqs[i] for i in followers], cache, [n for _, n in followers.values()])
        self.stats.prompt_tokens += sum(len(s.prompt) for s in seqs)

    def forward_prompts(self, seqs: list[_Sequence], cache: KVCache, skip: list[int]) -> None:
        """One forward over the prompts past their first `skip` tokens (already in the cache)."""
        counts = [len(s.prompt) - k for s, k in zip(seqs, skip, strict=True)]
        tokens = torch.tensor([t for s, k in zip(seqs, skip, strict=True) for t in s.prompt[k:]], device=self.device)
        last = torch.tensor(counts, device=self.device).cumsum(0) - 1
        slots = [s.slot for s in seqs]
        logits = self.proposer.prefill(tokens, cache.plan(slots, counts), cache, last)
        cache.advance(slots, counts)
        self.accept(seqs, logits, Proposal([[] for _ in seqs]), list(range(len(seqs))))

    def decode(self, seqs: list[_Sequence], cache: KVCache) -> None:
        """One forward for the whole batch: each sample's last token plus its drafts (none without a drafter)."""
        slots = [s.slot for s in seqs]
        start = time.perf_counter()
        proposal = self.proposer.propose(self.batch(seqs), cache)
        drafted = self.clock()
        self.draft_cost.setdefault(len(seqs), CostCurve()).record(proposal.passes, drafted - start)
        inputs = [[s.out[-1], *d] for s, d in zip(seqs, proposal.drafts, strict=True)]
        if self.padded:  # the vanilla baseline: pad to the longest
            n = max(map(len, inputs))
            inputs = [x + x[-1:] * (n - len(x)) for x in inputs]
        counts = [len(x) for x in inputs]
        tokens = torch.tensor([t for x in inputs for t in x], device=self.device)
        logits = self.proposer.verify(tokens, cache.plan(slots, counts), cache, proposal)
        self.verify_cost.record(len(tokens), self.clock() - drafted)
        gained = self.accept(seqs, logits, proposal, list(accumulate(counts, initial=0))[:-1])
        # each cache keeps its input token plus the accepted drafts (padded: all grow by the batch's most)
        cache.advance(slots, gained, grow=max(gained) if self.padded else None)
        self.stats.decode_steps += len(seqs)

    def batch(self, seqs: list[_Sequence]) -> Batch:
        """What the proposer needs to know of the batch this step: caps within each sample's max_tokens left."""
        spec = self.speculative
        most = spec.num_speculative_tokens if spec else 0
        return Batch(
            read_contexts=lambda: [s.prompt + s.out for s in seqs],
            slots=[s.slot for s in seqs],
            caps=[min(most, s.params.max_tokens - len(s.out) - 1) for s in seqs],
            rates=lambda source: self.acceptance_rates(seqs, source),
            threshold=spec.draft_threshold if spec else 1.0,
            afford=lambda lengths, rates, deep: self.affordable(seqs, lengths, rates, deep),
        )

    def clock(self) -> float:
        """`time.perf_counter()` once the device has run its queued work: a GPU runs kernels asynchronously, so a
        forward timed without waiting would cost only its launches to the drafting cost model."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @staticmethod
    def acceptance_rates(seqs: list[_Sequence], source: str) -> list[float]:
        """Each sample's recent acceptance rate of `source`'s drafts: a Beta(1, 1)-like prior; the decay lets a
        sample whose drafts stopped being accepted try again later."""
        return [(s.hits.get(source, 0.0) + 1) / (s.trials.get(source, 0.0) + 2) for s in seqs]

    def affordable(self, seqs: list[_Sequence], lengths: list[int], rates: list[float], deep: list[bool]) -> list[int]:
        """Of lengths[i] possible draft tokens of sample i, each kept with probability about rates[i] ** j, how many
        to verify: within the batch's per-step budget, and with `cost_aware` the count that maximises the expected
        tokens per second on this machine. `deep[i]`: sample i's drafter runs a forward per draft token. Verifying
        and drafting are timed apart: a step without drafts is measured first (one per batch size), then a step
        with every draft, so that each cost has two counts before the cost model decides."""
        spec, batch = self.speculative, len(seqs)
        if not spec.cost_aware:
            return draft_lengths(rates, lengths, 0.0, spec.max_draft_tokens_per_step)
        drafting = self.draft_cost.get(batch)
        if drafting is None or not self.verify_cost.known(batch):
            return [0] * batch
        sequential = any(d and n for d, n in zip(deep, lengths, strict=True))
        if len(self.verify_cost.seconds) < 2 or (sequential and len(drafting.seconds) < 2):
            return draft_lengths(rates, lengths, 0.0, spec.max_draft_tokens_per_step)
        return draft_lengths(
            rates,
            lengths,
            0.0,
            spec.max_draft_tokens_per_step,
            self.verify_cost,
            drafting,
            deep if sequential else None,
        )

    def accept(self, seqs: list[_Sequence], logits: Tensor, proposal: Proposal, firsts: list[int]) -> list[int]:
        """Verify every sample's drafts against its rows of logits (firsts[i] onward) and append what it gains.
        Returns the tokens each sample gained (accepted drafts + 1), before any stop cut them short."""
        st, sources = self.stats, proposal.sources or [""] * len(seqs)
        argmax = logits.argmax(-1).tolist() if any(s.params.temperature == 0 for s in seqs) else []
        logprobs = torch.log_softmax(logits, -1) if any(s.params.logprobs for s in seqs) else None
        gained = []
        for seq, draft, first, source in zip(seqs, proposal.drafts, firsts, sources, strict=True):
            if seq.params.temperature == 0:
                tokens = accept_greedy(argmax[first : first + len(draft) + 1], draft)
            else:
                rows = logits[first : first + len(draft) + 1]
                tokens = accept_sampled(rows, draft, seq.params, seq.seed, len(seq.out))
            kept = len(tokens) - 1
            seq.forward_passes += 1
            seq.draft_tokens += len(draft)
            seq.accepted_tokens += kept
            for name in seq.hits:  # every drafter's counts decay each step, so an idle one gets tried again
                seq.hits[name], seq.trials[name] = 0.8 * seq.hits[name], 0.8 * seq.trials[name]
            if draft:
                seq.hits[source] = seq.hits.get(source, 0.0) + kept
                seq.trials[source] = seq.trials.get(source, 0.0) + min(len(tokens), len(draft))
            st.draft_tokens += len(draft)
            st.accepted_tokens += kept
            if draft:
                st.source_drafts[source] = st.source_drafts.get(source, 0) + len(draft)
                st.source_accepted[source] = st.source_accepted.get(source, 0) + kept
            gained.append(len(tokens))
            for j, token in enumerate(tokens):
                seq.out.append(token)
                if seq.params.logprobs:
                    seq.logprobs.append(float(logprobs[first + j, token]))
                self.check_finished(seq)
                if seq.finish:
                    break
        self.stats.forward_passes += 1
        return gained

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

    def retire(self) -> list[_Sequence]:
        """Take the finished samples out of the batch: their slots are free for the next requests, and what they
        computed goes to the prefix store."""
        finished = [s for s in self.running if s.finish is not None]
        self.running = [s for s in self.running if s.finish is None]
        for seq in finished:
            if self.reuses_prefixes:
                self.prefix_store.put(seq.prompt + seq.out, self.cache, seq.slot)
            self.cache.release(seq.slot)
            self.stats.generated_tokens += len(seq.out)
        return finished

    def result(self, seq: _Sequence) -> Generation:
        text = seq.text if seq.text is not None else self.tokenizer.decode(seq.out, skip_special_tokens=True)
        return Generation(
            text=text,
            token_ids=seq.out,
            finish_reason=seq.finish,
            prompt_tokens=len(seq.prompt),
            forward_passes=seq.forward_passes,
            draft_tokens=seq.draft_tokens,
            accepted_tokens=seq.accepted_tokens,
            logprobs=seq.logprobs if seq.params.logprobs else None,
        )


def make_proposer(model: Transformer, spec: SpeculativeConfig | None, drafter: Drafter | None) -> Proposer:
    """The proposer a config asks for: a token drafter given, prompt lookup, Kangaroo, the hybrid, or none."""
    if drafter is not None or spec is None:
        return TokenProposer(model, drafter)
    lookup = PromptLookup(spec.prompt_lookup_max, spec.prompt_lookup_min)
    if spec.method == "prompt_lookup":
        return TokenProposer(model, lookup, "lookup")
    options = {"max_steps": spec.num_speculative_tokens}
    if spec.confidence_threshold is not None:
        options["threshold"] = spec.confidence_threshold
    kangaroo = load_adapter(spec.adapter or default_adapter_dir(model), model, **options)
    return kangaroo if spec.method == "kangaroo" else Hybrid(kangaroo, lookup)


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


def encode_prompt(tokenizer, prompt: str | list[ChatMessage]) -> list[int]:
    """Token ids of a text prompt, or of chat messages rendered with the model's chat template (ending in an
    assistant message: that message is continued). Every backend that tokenizes locally uses this, so the same
    request means the same tokens everywhere."""
    if isinstance(prompt, str):
        check_unicode(prompt, "the prompt")
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            check_unicode(str(m.get("content", "")), "a chat message")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("chat messages given but the tokenizer has no chat template")
        # a last assistant message is a prefix to continue (a repaired answer), not a finished turn
        go_on = prompt[-1].get("role") == "assistant"
        text = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=not go_on, continue_final_message=go_on, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    raise InvalidRequestError(f"a prompt must be text, chat messages or in-vocabulary token ids, got {prompt!r:.80}")


def read_eos(folder: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (an int or a list), if present."""
    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
