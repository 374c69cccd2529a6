"""The engine: greedy output equals transformers' generate one prompt at a time; slots are reused; errors are ours."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from fot.config import SamplingParams
from fot.errors import InvalidRequestError
from fot.speculative import kernels
from fot.speculative.engine import Engine
from fot.speculative.kernels import cpu_has_fast_bf16, cpu_has_native_bf16, resolve_dtype

PROMPTS = [
    "The quick brown fox",
    "12 + 30 =",
    "Game of 24: 4 + 6 = 10 (left: 1 10 4). What",
    "Paris",
    "Refine the answer step by step. The lazy dog jumps over the brown fox and",
]


@pytest.fixture(scope="module")
def hf_cache():
    return {}


def hf_greedy(folder, ids: list[int], n: int, hf_cache) -> list[int]:
    if folder not in hf_cache:
        hf_cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = hf_cache[folder].generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("max_batch", [1, 2, 16])
def test_greedy_batch_equals_transformers_one_by_one(tiny_model_dir, max_batch, hf_cache):
    engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=max_batch)
    rng = random.Random(max_batch)
    params = [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in PROMPTS]
    outs = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs, strict=True):
        ids = engine.tokenize(prompt)
        assert out.token_ids == hf_greedy(tiny_model_dir, ids, p.max_tokens, hf_cache)
        assert out.finish_reason == "length" and out.generated_tokens == p.max_tokens
        assert out.prompt_tokens == len(ids)


def test_bf16_engine_generates(tiny_llama_dir):
    """bf16 runs everywhere (packed where oneDNN supports it) and stays close to fp32's greedy output."""
    fp32 = Engine.from_pretrained(tiny_llama_dir, dtype="float32").generate(PROMPTS, {"max_tokens": 8})
    bf16 = Engine.from_pretrained(tiny_llama_dir, dtype="bfloat16").generate(PROMPTS, {"max_tokens": 8})
    assert all(o.generated_tokens >= 1 for o in bf16)
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp32, bf16, strict=True)) >= 3


def test_dtype_auto_is_bf16_where_it_is_exact_and_fast_follows_the_hardware():
    """auto: bf16 on a CPU where our kernels run (speculative output is exact there in bf16 too) and on an
    accelerator, fp32 on other CPUs; fast: bf16 on any CPU with native bf16 instructions."""
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if kernels.load() is not None else torch.float32)
    assert resolve_dtype("auto", "cuda") == resolve_dtype("fast", "cuda") == torch.bfloat16
    assert resolve_dtype("fast", "cpu") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # vLLM's own kernels: bf16 only natively
    assert resolve_dtype("auto", "cpu", ours=False) == resolve_dtype("fast", "cpu", ours=False) == native
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float32, "cuda") == torch.float32


def test_slot_reuse_over_many_requests(tiny_llama_dir):
    """More requests than slots, of mixed lengths: every result equals the same request served alone."""
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32", max_batch=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 40))] for _ in range(11)]
    params = [SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True) for _ in prompts]
    batched = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, batched, strict=True):
        assert out.token_ids == engine.generate([prompt], p)[0].token_ids
    assert engine.stats.requests == 22


def test_chat_template_and_eos(tiny_llama_dir):
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenize(messages)
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    # Force an EOS: whatever greedy would produce first is declared the end token.
    first = engine.generate([messages], {"max_tokens": 1})[0].token_ids[0]
    engine.eos_ids = {first}
    out = engine.generate([messages], {"max_tokens": 10})[0]
    assert out.finish_reason == "stop" and out.token_ids == [first]
    assert engine.generate([messages], {"max_tokens": 3, "ignore_eos": True})[0].generated_tokens == 3


def test_stop_strings_truncate_text(tiny_llama_dir):
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    full = engine.generate(["The quick brown fox"], {"max_tokens": 20, "ignore_eos": True})[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate(["The quick brown fox"], {"max_tokens": 20, "stop": [stop], "ignore_eos": True})[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_logprobs_match_transformers(tiny_llama_dir, hf_cache):
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    out = engine.generate(["12 + 30 ="], {"max_tokens": 6, "logprobs": True, "ignore_eos": True})[0]
    ids = engine.tokenize("12 + 30 =") + out.token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    n = len(engine.tokenize("12 + 30 ="))
    ref = [logp[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(ref, abs=1e-4)
    assert out.mean_logprob == pytest.approx(sum(ref) / len(ref), abs=1e-4)


def test_sampling_seeded_and_filters(tiny_llama_dir):
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    p = {"max_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a = engine.generate(PROMPTS, p)
    b = engine.generate(PROMPTS[::-1], p)[::-1]  # a request's seed fixes its output, whatever its batch position
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    greedy = engine.generate(PROMPTS, {"max_tokens": 12, "ignore_eos": True})
    top1 = engine.generate(PROMPTS, {**p, "top_k": 1})
    tiny_p = engine.generate(PROMPTS, {**p, "top_p": 1e-6})
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy] == [o.token_ids for o in tiny_p]
    hot = engine.generate(PROMPTS, {**p, "temperature": 5.0, "seed": 1})
    assert [o.token_ids for o in hot] != [o.token_ids for o in greedy]


@pytest.mark.parametrize(
    ("prompts", "params", "match"),
    [
        ([], None, "non-empty list"),
        ("just a string", None, "non-empty list"),
        ([""], None, "prompt 0 is empty"),
        (["hi"], {"max_tokens": 0}, "max_tokens"),
        (["hi"], {"temperature": -1}, "temperature"),
        (["hi"], {"beam_width": 4}, "beam_width"),
        (["hi"], {"max_tokens": 600}, "exceed the context of 512"),
        ([[1, 2, 10**6]], None, "token ids"),
        ([["not", "ids"]], None, "token ids"),
        (["a", "b"], [{"max_tokens": 2}], "1 sampling params for 2 prompts"),
    ],
)
def test_bad_input_fails_before_work(tiny_llama_dir, prompts, params, match):
    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(prompts, params)
    assert engine.stats.forward_passes == 0


def test_bad_engine_options(tiny_llama_dir):
    with pytest.raises(InvalidRequestError, match="max_batch"):
        Engine.from_pretrained(tiny_llama_dir, max_batch=0)
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        Engine.from_pretrained(tiny_llama_dir, dtype="int3")


def test_prompts_sharing_a_prefix_compute_it_once_and_decode_as_transformers(tiny_model_dir, hf_cache):
    """Prompts admitted together that share >= min_shared_prefix leading tokens copy that prefix's cache entries
    from the first of them: fewer tokens computed, the same greedy output as transformers one by one (with and
    without drafts), and nothing shared when switched off."""
    stem = list(range(3, 40))  # 37 shared token ids
    prompts = [stem + [50, 51, 52], stem + [60], stem[:20] + [70, 71], stem + [50, 51, 52], [5, 6, 7]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 5, 12, 7, 6)]
    want = [hf_greedy(tiny_model_dir, p, sp.max_tokens, hf_cache) for p, sp in zip(prompts, params, strict=True)]
    for speculative in (None, "prompt_lookup"):
        engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", speculative=speculative)
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        # 1 and 3 copy 37 tokens and 39 (all but the last) from prompt 0; 2 copies 20 from it
        assert engine.last_stats.reused_prompt_tokens == 37 + 20 + 39
        assert engine.last_stats.prompt_tokens == sum(map(len, prompts))
    off = Engine.from_pretrained(tiny_model_dir, dtype="float32", min_shared_prefix=0)
    assert [o.token_ids for o in off.generate(prompts, params)] == want
    assert off.last_stats.reused_prompt_tokens == 0


def test_share_prefixes_picks_the_longest_earlier_leader():
    from fot.speculative.cache import share_prefixes

    a, b = [1] * 20 + [2] * 10, [1] * 20 + [3] * 10
    leaders, followers = share_prefixes([a, b, a + [4], b[:25] + [5], [9] * 30], min_shared=16)
    assert leaders == [0, 4] and followers == {1: (0, 20), 2: (0, 30), 3: (0, 20)}
    assert share_prefixes([a, a], min_shared=16) == ([0], {1: (0, 29)})  # the copy keeps one token to compute
    assert share_prefixes([a, a], min_shared=16, known=[0, 29]) == ([0, 1], {})  # the store has it all already
    assert share_prefixes([a, a], min_shared=0) == ([0, 1], {})


def test_later_prompts_reuse_what_finished_samples_computed(tiny_model_dir, hf_cache):
    """A prompt that goes on from a finished sample (its prompt, its output, more) or branches off one copies the
    stored cache entries and computes only the rest, with transformers' greedy output; switched off, nothing is
    kept."""
    first = list(range(3, 40))
    for speculative in (None, "prompt_lookup"):
        engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", speculative=speculative)
        [out] = engine.generate([first], SamplingParams(max_tokens=9, ignore_eos=True))
        assert len(engine.prefix_store) == 1
        prompts = [first + out.token_ids + [50, 51], first[:30] + [60, 61], [5, 6, 7]]
        outs = engine.generate(prompts, SamplingParams(max_tokens=7, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(tiny_model_dir, p, 7, hf_cache) for p in prompts]
        # the first prompt goes on from all 45 stored entries (46 where a draft reached the last token), the
        # second shares 30; the last generated token of a sample is never fed, so it has no entry
        assert engine.last_stats.reused_prompt_tokens in (45 + 30, 46 + 30)
        # kept: the first prompt's sample, superseding the entry it went on from; not kept: the second (8 tokens
        # beyond what that entry holds, fewer than min_shared_prefix) and the third (shorter than that)
        assert len(engine.prefix_store) == 1
    off = Engine.from_pretrained(tiny_model_dir, dtype="float32", min_shared_prefix=0)
    off.generate([first], SamplingParams(max_tokens=9, ignore_eos=True))
    assert len(off.prefix_store) == 0


def test_requests_that_arrive_while_others_run_join_them(tiny_model_dir, hf_cache):
    """Continuous batching: requests submitted between steps join the running batch (the cache grows for more
    and longer samples), every sample still decodes as transformers does alone, and the cache's memory goes back
    once nothing runs."""
    engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=3, speculative="prompt_lookup")
    ids = [engine.tokenize(p) for p in PROMPTS]
    first = engine.submit(ids[:1], SamplingParams(max_tokens=12, ignore_eos=True))
    finished = engine.step() + engine.step()
    assert engine.cache.n_slots == 1 and not finished
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.generate(ids[:1])
    later = engine.submit([ids[4] * 3, *ids[1:4]], SamplingParams(max_tokens=20, ignore_eos=True))
    sizes = set()
    while not engine.idle:
        sizes.add((engine.cache.n_slots, engine.cache.max_len))
        finished += engine.step()
    assert max(sizes)[0] == 3 and max(length for _, length in sizes) >= len(ids[4]) * 3 + 20
    assert sorted(map(id, finished)) == sorted(map(id, first + later)) and engine.cache is None
    assert engine.stats.requests == 5
    for seq in first + later:
        assert engine.result(seq).token_ids == hf_greedy(tiny_model_dir, seq.prompt, seq.params.max_tokens, hf_cache)


def test_cancelled_samples_leave_the_engine_and_the_others_decode_as_before(tiny_model_dir, hf_cache):
    """`cancel` drops running and waiting samples and frees their slots; the rest decode exactly as transformers
    does alone, and a slot a cancelled sample held takes the next request."""
    engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=2, speculative="prompt_lookup")
    ids = [engine.tokenize(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    running = engine.submit(ids[:2], params)
    waiting = engine.submit(ids[2:4], params)
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    engine.cancel([running[1], waiting[0]])
    assert engine.running == [running[0]] and list(engine.waiting) == [waiting[1]]
    assert engine.stats.cancelled == 2 and engine.cache.n_free == 1
    finished = []
    while not engine.idle:
        finished += engine.step()
    assert sorted(map(id, finished)) == sorted(map(id, [running[0], waiting[1]])) and engine.cache is None
    for seq in (running[0], waiting[1]):
        assert engine.result(seq).token_ids == hf_greedy(tiny_model_dir, seq.prompt, 16, hf_cache)
    engine.cancel([running[0]])  # finished samples are left alone
    assert engine.stats.cancelled == 2


def test_the_cache_grows_only_where_it_is_short(tiny_model_dir):
    """Each admission of a request that arrived while others ran grew the cache's length by half as well, needed
    or not: twelve 3-token requests of 100 tokens took it from 103 entries to 1167, past the context of 512."""
    engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=12)
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    sizes = set()
    for i in range(12):
        engine.submit([[5 + i, 6, 7]], params)
        engine.step()
        sizes.add((engine.cache.n_slots, engine.cache.max_len))
    assert {length for _, length in sizes} == {103} and max(sizes)[0] == 12
    while not engine.idle:
        engine.step()


def test_a_drafter_that_fails_to_load_leaves_the_engine_as_it_was(tiny_model_dir):
    """The new config was set before its drafter was built: after a refused adapter the engine said "kangaroo" and
    ran the old drafter with the new config's caps."""
    from fot.errors import ModelError

    engine = Engine.from_pretrained(tiny_model_dir, dtype="float32", speculative="prompt_lookup")
    before = (engine.speculative, engine.proposer)
    with pytest.raises(ModelError):
        engine.set_speculative({"method": "kangaroo", "adapter": "/no/such/adapter", "num_speculative_tokens": 2})
    assert (engine.speculative, engine.proposer) == before


def test_a_draw_at_the_top_of_the_cdf_never_takes_a_token_of_probability_zero():
    """u * total rounded up to the total in fp32 gave the vocabulary's last id, here of probability 0."""
    from fot.speculative.verify import draw

    p = torch.tensor([0.25, 0.75, 0.0, 0.0])
    assert [draw(p, u) for u in (0.0, 0.2, 0.3, 1 - 1e-9)] == [0, 0, 1, 1]
