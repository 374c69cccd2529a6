"""EMS-SD is lossless: speculative output is plain output, token for token (greedy) or in distribution (sampling)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import assert_same_greedy, save_tiny
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from fot.config import SamplingParams, SpeculativeConfig
from fot.errors import InvalidRequestError
from fot.speculative import kernels
from fot.speculative.drafters import PromptLookup, draft_lengths
from fot.speculative.engine import Engine
from fot.speculative.verify import accept_greedy, accept_sampled, probabilities


class OracleDrafter:
    """Proposes a random number of tokens (0..limit) from a known continuation, each replaced by a random token with
    probability `noise`: drafts that are partly right, so acceptance, rejection and the bonus token all happen."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], vocab=384, noise=0.0, seed=0, full=False):
        self.continuations, self.vocab, self.noise, self.full = continuations, vocab, noise, full
        self.rng = random.Random(seed)

    def propose(self, contexts, limits):
        drafts = []
        for ctx, k in zip(contexts, limits, strict=True):
            known = next(((len(p), c) for p, c in self.continuations.items() if tuple(ctx[: len(p)]) == p), (0, []))
            done = len(ctx) - known[0]
            draft = known[1][done : done + (k if self.full else self.rng.randint(0, k))]
            drafts.append([self.rng.randrange(self.vocab) if self.rng.random() < self.noise else t for t in draft])
        return drafts


class TooLong:
    def propose(self, contexts, limits):
        return [[1] * (k + 1) for k in limits]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    plain = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=16)
    spec = Engine.from_pretrained(
        tiny_model_dir, dtype="float32", max_batch=16, speculative={"num_speculative_tokens": 6}
    )
    return plain, spec


# ---- the pieces ------------------------------------------------------------------------------------------------
def test_prompt_lookup_takes_the_latest_match_and_respects_limits():
    d = PromptLookup(max_ngram=2, min_ngram=1)
    ctx = [5, 6, 7, 1, 5, 6, 8, 9, 4, 5, 6]
    assert d.propose([ctx], [3]) == [[8, 9, 4]]  # "5 6" last seen before the end at index 4 -> 8 9 4
    assert d.propose([ctx], [1]) == [[8]]
    assert d.propose([ctx], [0]) == [[]]
    assert d.propose([[1, 2, 3]], [4]) == [[]]  # no earlier occurrence
    assert d.propose([[3, 4, 9, 4]], [2]) == [[9, 4]]  # falls back to a 1-gram
    assert d.propose([[7]], [2]) == [[]]
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_draft_lengths_follow_acceptance_rates_and_the_budget():
    assert draft_lengths([0.9, 0.5, 0.1], [8, 8, 8], threshold=0.25, budget=None) == [8, 2, 0]  # 0.9**8 = 0.43
    assert draft_lengths([0.9, 0.5, 0.1], [3, 8, 8], threshold=0.0, budget=None) == [3, 8, 8]
    assert draft_lengths([0.9, 0.5, 0.1], [8, 8, 8], threshold=0.25, budget=4) == [4, 0, 0]  # the likeliest four
    assert draft_lengths([0.9, 0.9], [0, 2], threshold=0.25, budget=None) == [0, 2]


def test_cost_aware_drafting_drafts_less_where_verification_is_dear():
    """t = 50 ms + 2 ms per token: at batch 1 a 0.43-likely token pays (it adds 2 ms to a ~52 ms step), at
    batch 16 (a 82 ms step for 16 tokens) it does not, and even likely tokens stop once the step grows."""

    def cost(tokens: int) -> float:
        return 0.050 + 0.002 * tokens

    assert draft_lengths([0.9], [8], 0.0, cost=cost) == [8]
    big = draft_lengths([0.9] * 16, [8] * 16, 0.0, cost=cost)
    assert 0 < sum(big) < 16 * 8 and max(big) <= 8
    assert draft_lengths([0.3] * 16, [8] * 16, 0.0, cost=cost) == [0] * 16
    assert draft_lengths([0.3] * 16, [8] * 16, 0.0) == [8] * 16  # without a cost model: the threshold alone


def test_cost_aware_drafting_looks_past_a_jump_in_cost():
    """Up to 4 tokens cost one token's time, the 5th doubles it (the GEMV kernel hands over to a GEMM), then it
    grows slowly: at batch 4 one more token does not pay, but 8 likely ones do; unlikely ones never do."""

    def cost(tokens: int) -> float:
        return 0.010 if tokens <= 4 else 0.020 + 0.0005 * tokens

    assert draft_lengths([0.3] * 4, [8] * 4, 0.0, cost=cost) == [0] * 4
    assert sum(draft_lengths([0.95] * 4, [8] * 4, 0.0, cost=cost)) >= 8
    assert draft_lengths([0.9], [3], 0.0, cost=cost) == [3]  # 1 + 3 tokens: free


def test_draft_passes_are_paid_by_the_samples_that_run_them():
    """Verification is free up to 8 tokens (10 ms); a draft pass costs what a verification does. A batch-1 Kangaroo
    draft (a pass per token) stops where the next pass costs more than its token is likely to bring; prompt lookup's
    draft (no passes) goes to its cap."""
    from fot.speculative.drafters import PassCost

    def cost(tokens: int) -> float:
        return 0.010 if tokens <= 8 else 0.010 + 0.002 * (tokens - 8)

    deep = PassCost(cost, [True])
    assert draft_lengths([0.9], [6], 0.0, cost=cost) == [6]
    assert draft_lengths([0.9], [6], 0.0, cost=cost, passes=deep) == [3]  # 3.44 tokens / 50 ms beats 4.10 / 60
    assert draft_lengths([0.9], [6], 0.0, cost=cost, passes=PassCost(cost, [False])) == [6]
    assert draft_lengths([0.5], [6], 0.0, cost=cost, passes=deep) == [0]  # 1.5 / 30 ms loses to 1 / 20 ms
    # four samples: a depth they share is one pass over all of them, so they draft as deep as one sample alone,
    assert (
        draft_lengths([0.9] * 4, [6] * 4, 0.0, cost=lambda t: 0.010, passes=PassCost(lambda r: 0.010, [True] * 4))
        == [3] * 4
    )
    # until verifying past 8 tokens costs too
    assert draft_lengths([0.9] * 4, [6] * 4, 0.0, cost=cost, passes=PassCost(cost, [True] * 4)) == [1] * 4


def test_accept_greedy():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert accept_greedy([3], []) == [3]


@pytest.mark.parametrize("draft", [[0], [2, 1], [4, 4, 4]])
def test_rejection_sampling_keeps_the_target_distribution(draft):
    """The first emitted token of accept_sampled follows p whatever the (deterministic) draft is."""
    torch.manual_seed(0)
    logits = torch.randn(len(draft) + 1, 5) * 1.5
    params = SamplingParams(temperature=1.0)
    n = 20000
    firsts = Counter(accept_sampled(logits, draft, params, seed, 0)[0] for seed in range(n))
    p = probabilities(logits[0], params)
    for token in range(5):
        assert abs(firsts[token] / n - float(p[token])) < 0.015


# ---- lossless, greedy ----------------------------------------------------------------------------------------
STEM = list(range(100, 130))  # a prompt start shared across batches and examples: the prefix store is used


def seeded_case(seed: int, batch: int, max_batch: int, layout: str, stem: bool = False):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 40))] for _ in range(batch)]
    if stem:
        prompts = [STEM[: rng.randint(16, 30)] + p for p in prompts]
    params = [
        SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True, logprobs=rng.random() < 0.3) for _ in prompts
    ]
    return seed, prompts, params, max_batch, layout


@st.composite
def batches(draw):
    seed, batch = draw(st.integers(0, 2**16)), draw(st.integers(1, 16))
    layout = draw(st.sampled_from(["unpadded", "padded"]))
    return seeded_case(seed, batch, draw(st.integers(1, 16)), layout, draw(st.booleans()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=batches(), noise=st.sampled_from([0.0, 0.2, 1.0]))
@example(case=seeded_case(8997, 10, 4, "padded"), noise=0.0)  # llama: an exact tie (two logits 5.2673) at token 10
def test_greedy_speculative_equals_plain(engines, reference_model, case, noise):
    plain, spec = engines
    seed, prompts, params, max_batch, layout = case
    plain.max_batch = spec.max_batch = max_batch
    expected = plain.generate(prompts, params)
    spec.set_speculative(
        SpeculativeConfig(num_speculative_tokens=6, layout=layout),
        OracleDrafter({tuple(p): e.token_ids for p, e in zip(prompts, expected, strict=True)}, 384, noise, seed),
    )
    got = spec.generate(prompts, params)
    for p, e, g in zip(prompts, expected, got, strict=True):
        assert g.accepted_tokens <= g.draft_tokens
        if not assert_same_greedy(reference_model, p, e, g):
            continue
        assert g.forward_passes <= e.forward_passes
        if e.logprobs is not None:
            assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    s = spec.last_stats
    assert s.accepted_tokens == sum(g.accepted_tokens for g in got) and s.requests == len(prompts)
    assert s.generated_tokens == sum(e.generated_tokens for e in expected)


@pytest.fixture(scope="module")
def bf16_engines(tiny_model_dir):
    plain = Engine.from_pretrained(tiny_model_dir, dtype="bfloat16", max_batch=16)
    spec = Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=16, speculative={"layout": "unpadded"})
    return plain, spec


def bf16_cases(test):
    """Hypothesis over a seed, a batch of 1..16 prompts, max_batch 1..16 and drafts with 0/20/100% wrong tokens."""
    cases = given(
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 16),
        max_batch=st.integers(1, 16),
        noise=st.sampled_from([0.0, 0.2, 1.0]),
    )
    return settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])(
        cases(test)
    )


@bf16_cases
def test_greedy_speculative_equals_plain_in_bf16_too(bf16_engines, seed, batch, max_batch, noise):
    """Where the CPU kernels run, every op rounds a token alike whatever else the step holds (batch-invariant
    matmul, per-token attention, row-wise norms), so in bf16 too greedy speculative output is plain output token
    for token, with the same log-probs, not just up to near-ties: also when drafts change which requests are
    admitted (and prefilled) together."""
    if kernels.load() is None:
        return
    plain, spec = bf16_engines
    plain.max_batch = spec.max_batch = max_batch
    _, prompts, params, _, _ = seeded_case(seed, batch, max_batch, "unpadded", stem=seed % 2 == 0)
    expected = plain.generate(prompts, params)
    spec.set_speculative(
        spec.speculative,
        OracleDrafter({tuple(p): e.token_ids for p, e in zip(prompts, expected, strict=True)}, 384, noise, seed),
    )
    got = spec.generate(prompts, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.logprobs for g in got] == [e.logprobs for e in expected]


@bf16_cases
def test_sampled_speculative_equals_sampled_plain_token_for_token(bf16_engines, seed, batch, max_batch, noise):
    """A sampled token is a function of the request's seed and its position (verify.uniform): with partly wrong
    drafts, other batch sizes and other company in the batch, seeded sampling gives plain decoding's tokens, and a
    request's output does not depend on what ran beside it."""
    if kernels.load() is None:
        return
    plain, spec = bf16_engines
    plain.max_batch, spec.max_batch = 16, max_batch
    _, prompts, params, _, _ = seeded_case(seed, batch, max_batch, "unpadded", stem=seed % 2 == 0)
    r = random.Random(seed)
    params = [p.model_copy(update={"temperature": r.choice([0.7, 1.0]), "top_p": r.choice([1.0, 0.9]),
                                   "seed": r.randrange(2**31)}) for p in params]  # fmt: skip
    expected = plain.generate(prompts, params)
    alone = plain.generate(prompts[:1], params[:1])  # the first request with no company
    assert alone[0].token_ids == expected[0].token_ids
    continuations = {tuple(p): e.token_ids for p, e in zip(prompts, expected, strict=True)}
    eager = {"layout": "unpadded", "cost_aware": False, "draft_threshold": 0.0}  # the drafts are all verified
    spec.set_speculative(eager, OracleDrafter(continuations, 384, noise, seed, full=True))
    got = spec.generate(prompts, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    long = sum(len(e.token_ids) > 2 for e in expected)  # a decode step with room for a draft: 3 tokens or more
    assert (spec.last_stats.draft_tokens > 0) == (long > 0)  # drafts were there to keep or reject


def test_good_drafts_save_forward_passes_and_are_counted(engines):
    plain, spec = engines
    spec.max_batch = 16
    config = SpeculativeConfig(num_speculative_tokens=4, draft_threshold=0, cost_aware=False)
    prompts = [[5 + i, 40, 41, 42] for i in range(8)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = plain.generate(prompts, params)
    spec.set_speculative(
        config, OracleDrafter({tuple(p): e.token_ids for p, e in zip(prompts, expected, strict=True)}, full=True)
    )
    got = spec.generate(prompts, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    for g in got:  # 1 token from the prefill, then 4 drafts + 1 per step: 1 + 5 + 5 + 5 + (4 drafts capped at 3 + 1)
        assert g.forward_passes == 5 and g.draft_tokens == 15 and g.accepted_tokens == 15
        assert g.accept_length == pytest.approx(1 + 15 / 4)
    s = spec.last_stats
    assert s.forward_passes == 5 and s.decode_steps == 32 and s.draft_tokens == 120 and s.acceptance_rate == 1.0
    assert s.accept_length == pytest.approx(1 + 120 / 32)


def test_stops_inside_an_accepted_draft(engines):
    """An EOS or a max_tokens limit in the middle of accepted drafts ends the sample there, as plain decoding does."""
    plain, spec = engines
    config = SpeculativeConfig(num_speculative_tokens=8, draft_threshold=0, cost_aware=False)
    prompt = [[7, 8, 9, 10]]
    full = plain.generate(prompt, {"max_tokens": 12, "ignore_eos": True})[0].token_ids
    spec.set_speculative(config, OracleDrafter({tuple(prompt[0]): full}, full=True))
    eos = full[5]
    for engine in (plain, spec):
        engine.eos_ids = {eos}
    try:
        want = plain.generate(prompt, {"max_tokens": 12})[0]
        got = spec.generate(prompt, {"max_tokens": 12})[0]
    finally:
        plain.eos_ids = spec.eos_ids = {plain.tokenizer.eos_token_id}
    assert got.token_ids == want.token_ids == full[: full.index(eos) + 1] and got.finish_reason == "stop"
    # one step of 8 drafts, all right: those after the EOS were never output, so they are not counted as accepted
    assert got.forward_passes == 2 and got.draft_tokens == 8
    assert got.accepted_tokens == spec.last_stats.accepted_tokens == len(got.token_ids) - 1


def test_forward_cost_averages_each_size_and_interpolates_between():
    from fot.speculative.drafters import ForwardCost

    cost = ForwardCost(decay=0.5)
    cost.record(4, 0.010)
    assert cost.known(4) and not cost.known(5)
    with pytest.raises(ValueError):
        cost(5)  # one size seen: nothing to interpolate with
    assert cost(3) == 0.010  # but fewer tokens cost what the smallest count did
    cost.record(4, 0.020)
    cost.record(12, 0.030)
    cost.record(20, 0.050)
    assert cost(4) == pytest.approx(0.015)  # the moving average of the two
    assert cost(8) == pytest.approx(0.0225)  # halfway from 4 to 12
    assert cost(30) == pytest.approx(0.075)  # the slope of the last two, carried on
    assert cost(1) == cost(-100) == pytest.approx(0.015)  # below the smallest: its cost (the weights are read)


def test_bad_drafters_and_configs_are_refused(engines):
    _, spec = engines
    spec.set_speculative(spec.speculative, TooLong())
    with pytest.raises(InvalidRequestError, match="drafter proposed"):
        spec.generate([[5, 6, 7]], {"max_tokens": 5})
    with pytest.raises(InvalidRequestError, match="speculative"):
        SpeculativeConfig.make({"num_speculative_tokens": 0})
    with pytest.raises(InvalidRequestError, match="speculative"):
        SpeculativeConfig.make("medusa")


# ---- lossless, sampling --------------------------------------------------------------------------------------
class RandomDrafter:
    def __init__(self, vocab: int, seed: int):
        self.vocab, self.rng = vocab, random.Random(seed)

    def propose(self, contexts, limits):
        return [[self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, k))] for k in limits]


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 6}])
def test_sampled_speculative_follows_the_plain_distribution(tmp_path, params):
    """On a 12-token vocabulary the exact distributions of the 2nd and 3rd generated tokens are computed from the
    model; samples drawn with random drafts (so accept, reject and residual draws all happen) must fit them
    (chi-square, p > 0.001), as must plain samples."""
    vocab, prompt, n = 12, [3, 7, 1, 4], 3000
    folder = save_tiny(tmp_path / "v12", "llama", vocab_size=vocab)
    params = SamplingParams(max_tokens=3, ignore_eos=True, **params)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = probabilities(hf(torch.tensor([prompt])).logits[0, -1], params)
        seq2 = torch.tensor([[*prompt, a] for a in range(vocab)])
        p2 = probabilities(hf(seq2).logits[:, -1], params)  # [t1, t2]
        seq3 = torch.tensor([[*prompt, a, b] for a in range(vocab) for b in range(vocab)])
        p3 = probabilities(hf(seq3).logits[:, -1], params).view(vocab, vocab, vocab)
    joint12 = p1[:, None] * p2
    exact = {1: joint12.sum(0), 2: (joint12[:, :, None] * p3).sum((0, 1))}
    plain = Engine.from_pretrained(folder, dtype="float32", max_batch=256, seed=1)
    spec = Engine.from_pretrained(
        folder,
        dtype="float32",
        max_batch=256,
        seed=2,
        speculative={"num_speculative_tokens": 2},
        drafter=RandomDrafter(vocab, 3),
    )
    for engine in (plain, spec):
        outs = engine.generate([prompt] * n, params)
        for position, p in exact.items():
            counts = torch.bincount(torch.tensor([o.token_ids[position] for o in outs]), minlength=vocab).float()
            big = p * n >= 5  # categories too rare for chi-square are pooled
            observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
            expected = torch.cat([p[big] * n, (p[~big] * n).sum(0, keepdim=True)])
            keep = expected > 0
            chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
            assert chi2 < 32.9, (engine is spec, position, chi2)  # chi-square critical value, 11 dof, p = 0.001
    assert spec.last_stats.draft_tokens > 0 and 0 < spec.last_stats.accepted_tokens < spec.last_stats.draft_tokens


# ---- the real model --------------------------------------------------------------------------------------------
def test_prompt_lookup_on_the_embedded_model_is_lossless_and_accepts(tmp_path):
    plain = Engine.from_pretrained("default", dtype="float32", max_batch=4)
    # Not cost-aware: how much it drafts must not hang on this machine's timings (the accept-length check below).
    fixed = SpeculativeConfig(method="prompt_lookup", cost_aware=False)
    spec = Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=4, speculative=fixed)
    answer = "The train travels 60 km in 1.5 hours, so its speed is 60 / 1.5 = 40 km per hour. The answer is 40."
    prompts = [
        [{"role": "user", "content": f"Repeat this answer exactly, word for word: {answer}"}],
        [{"role": "user", "content": f"Rewrite this answer, keeping the numbers: {answer} Make it clearer."}],
    ]
    expected = plain.generate(prompts, {"max_tokens": 40})
    got = spec.generate(prompts, {"max_tokens": 40})
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert spec.last_stats.accept_length > 1.5 and spec.last_stats.forward_passes < plain.last_stats.forward_passes
