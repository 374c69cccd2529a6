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

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fot.config import SamplingParams, SpeculativeConfig
from fot.errors import ContextOverflowError, InvalidRequestError
from fot.speculative.cache import KVCache, PaddedKVCache, PrefixStore, share_prefixes
from fot.speculative.drafters import Drafter, ForwardCost, PassCost, PromptLookup, draft_lengths
from fot.speculative.hybrid import Hybrid
from fot.speculative.kangaroo import adapter_folder, default_adapter_dir, load_adapter
from fot.speculative.kernels import resolve_dtype
from fot.speculative.model import Transformer
from fot.speculative.outputs import EngineStats, Generation
from fot.speculative.prompts import Prompt, encode_prompt, read_eos
from fot.speculative.proposer import Batch, Proposal, Proposer, TokenProposer
from fot.speculative.verify import accept_greedy, accept_sampled


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
        the forward-cost measurements start afresh: a Kangaroo cache keeps one more layer than a plain one, and
        what one drafter measured or cached must not speed up the next one's run."""
        if not self.idle:
            raise InvalidRequestError("the drafter can change only while the engine runs nothing")
        spec = SpeculativeConfig.make(speculative) or (SpeculativeConfig() if drafter else None)
        proposer = make_proposer(self.model, spec, drafter)  # may refuse (a bad adapter): nothing has changed yet
        if self.pack:
            proposer.pack()
        self.speculative, self.proposer = spec, proposer
        self.forward_cost = ForwardCost()  # a verification forward, by its token count
        self.pass_share: float | None = None  # a draft pass's time over a verification forward's of as many tokens
        self.prefix_store = PrefixStore(self.prefix_cache_mib << 20, min_new=max(self.min_shared_prefix, 1))

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "default", *, dtype: str | torch.dtype = "auto", device: str = "cpu", **kw
    ) -> Engine:
        from transformers import AutoTokenizer

        from fot.models import resolve_model

        spec = kw["speculative"] = SpeculativeConfig.make(kw.get("speculative"))  # bad ones fail before the load
        if spec is not None and spec.method != "prompt_lookup" and spec.adapter:
            adapter_folder(spec.adapter)
        folder = resolve_model(model)
        pack = kw.get("pack", True) and device == "cpu"  # then each weight is read straight into its packed layout
        net = Transformer.from_pretrained(folder, resolve_dtype(dtype, device), pack=pack)
        net = net if pack else net.to(device)  # a packed model stays on the CPU
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(net, tokenizer, eos_ids=read_eos(folder), **kw)

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
            raise ContextOverflowError(
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
            self.cache = (PaddedKVCache if self.padded else KVCache)(*shape, self.model.dtype, device=self.device)
        elif n_slots > self.cache.n_slots or max_len > self.cache.max_len:  # by half at least: copies are rare
            c, context = self.cache, self.model.args.max_seq_len
            slots = c.n_slots if n_slots <= c.n_slots else max(n_slots, min(self.max_batch, c.n_slots * 3 // 2))
            length = c.max_len if max_len <= c.max_len else max(max_len, min(context, c.max_len * 3 // 2))
            c.grow(slots, length)  # only the dimension that is short: the other grew past any need
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
        start = self.clock()
        proposal = self.proposer.propose(self.batch(seqs), cache)
        drafted = self.clock()
        inputs = cache.pad([[s.out[-1], *d] for s, d in zip(seqs, proposal.drafts, strict=True)])
        counts = [len(x) for x in inputs]
        tokens = torch.tensor([t for x in inputs for t in x], device=self.device)
        logits = self.proposer.verify(tokens, cache.plan(slots, counts), cache, proposal)
        self.forward_cost.record(len(tokens), self.clock() - drafted)
        if proposal.passes:
            self.record_passes(proposal.passes, drafted - start)
        gained = self.accept(seqs, logits, proposal, list(accumulate(counts, initial=0))[:-1])
        cache.keep(slots, gained)
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

    def record_passes(self, passes: list[int], seconds: float) -> None:
        """Time a step's draft passes as a share of verification forwards over as many tokens: one number for every
        batch size, so a drafter that runs layers per token is weighed at sizes it has not drafted at yet."""
        share, old = seconds / sum(self.forward_cost(rows) for rows in passes), self.pass_share
        decay = self.forward_cost.decay  # the same memory as the verification times it is divided by
        self.pass_share = share if old is None else decay * old + (1 - decay) * share

    def affordable(self, seqs: list[_Sequence], lengths: list[int], rates: list[float], deep: list[bool]) -> list[int]:
        """Of lengths[i] possible draft tokens of sample i, each kept with probability about rates[i] ** j, how many
        to verify: within the batch's per-step budget, and with `cost_aware` the count that maximises the expected
        tokens per second on this machine, where the samples flagged `deep` also pay a draft pass per token. A step
        without drafts is measured first (one per batch size), then at least one other token count (a step with
        every draft) before the cost model decides."""
        spec = self.speculative
        cost = self.forward_cost if spec.cost_aware else None
        if cost is not None and not cost.known(len(seqs)):
            return [0] * len(seqs)
        if cost is not None and len(cost.seconds) < 2:
            cost = None
        passes = None
        if cost is not None and self.pass_share is not None and any(deep):
            share = self.pass_share
            passes = PassCost(lambda rows: share * cost(rows), deep)
        return draft_lengths(rates, lengths, 0.0, spec.max_draft_tokens_per_step, cost, passes)

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
            for j, token in enumerate(tokens):
                seq.out.append(token)
                if seq.params.logprobs:
                    seq.logprobs.append(float(logprobs[first + j, token]))
                self.check_finished(seq)
                if seq.finish:
                    break
            used = min(kept, j + 1)  # drafts that verification kept and the output holds: none past a stop
            seq.forward_passes += 1
            seq.draft_tokens += len(draft)
            seq.accepted_tokens += used
            for name in seq.hits:  # every drafter's counts decay each step, so an idle one gets tried again
                seq.hits[name], seq.trials[name] = 0.8 * seq.hits[name], 0.8 * seq.trials[name]
            if draft:
                seq.hits[source] = seq.hits.get(source, 0.0) + kept
                seq.trials[source] = seq.trials.get(source, 0.0) + min(len(tokens), len(draft))
            st.draft_tokens += len(draft)
            st.accepted_tokens += used
            if draft:
                st.source_drafts[source] = st.source_drafts.get(source, 0) + len(draft)
                st.source_accepted[source] = st.source_accepted.get(source, 0) + used
            gained.append(len(tokens))
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
