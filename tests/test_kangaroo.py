"""Kangaroo and the hybrid (prompt lookup where it matches and does as well, Kangaroo elsewhere): lossless whatever
the adapter (untrained ones accept little and must still be exact), batched, with the sampling distribution kept;
adapters name their base model; training runs, checkpoints and resumes."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from conftest import assert_same_greedy, save_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fot.config import SamplingParams, SpeculativeConfig
from fot.errors import InvalidRequestError, ModelError
from fot.speculative.adapter_training import train_adapter
from fot.speculative.drafters import PromptLookup
from fot.speculative.engine import Engine
from fot.speculative.hybrid import Hybrid
from fot.speculative.kangaroo import Adapter, load_adapter, model_fingerprint, save_adapter
from fot.speculative.model import Transformer
from fot.speculative.proposer import Batch, Proposal


def random_adapter(folder, model: Transformer, exit_layer: int, vocab: list[int] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    adapter = Adapter(model.args)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    config = {"base_model": "tiny", "base": model_fingerprint(model), "exit_layer": exit_layer, "draft_vocab": vocab}
    save_adapter(folder, adapter, config)
    return folder


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    plain = Engine.from_pretrained(tiny_model_dir, dtype="float32", max_batch=16)
    folders = {
        "full": random_adapter(tmp_path_factory.mktemp("ad"), plain.model, exit_layer=1),
        "small-vocab": random_adapter(tmp_path_factory.mktemp("ad"), plain.model, 2, vocab=list(range(0, 384, 3))),
    }
    return plain, folders


def kangaroo(plain: Engine, adapter, method: str = "kangaroo", **spec) -> Engine:
    config = {"method": method, "adapter": str(adapter), "cost_aware": False, **spec}  # draft what it can
    return Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=plain.max_batch, speculative=config)


@st.composite
def cases(draw):
    rng = random.Random(draw(st.integers(0, 2**16)))
    batch = draw(st.integers(1, 16))
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 40))] for _ in range(batch)]
    if draw(st.booleans()):  # a shared start: prompts admitted later copy it from finished samples (prefix store)
        prompts = [list(range(100, 100 + rng.randint(16, 30))) + p for p in prompts]
    if draw(st.booleans()):  # text that repeats itself: prompt lookup finds matches (the hybrid mixes its drafters)
        prompts = [p + p[: rng.randint(1, len(p))] for p in prompts]
    params = [
        SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True, logprobs=rng.random() < 0.3) for _ in prompts
    ]
    spec = {
        "confidence_threshold": draw(st.sampled_from([0.0, 0.01, 0.05])),
        "num_speculative_tokens": draw(st.integers(1, 6)),
        "cost_aware": draw(st.booleans()),  # also with the drafts cut to what pays on this machine
    }
    return prompts, params, draw(st.integers(1, 16)), draw(st.sampled_from(["full", "small-vocab"])), spec


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), method=st.sampled_from(["kangaroo", "hybrid"]))
def test_greedy_kangaroo_and_hybrid_equal_plain(engines, reference_model, case, method):
    plain, folders = engines
    prompts, params, max_batch, adapter, spec = case
    plain.max_batch = max_batch
    expected = plain.generate(prompts, params)
    engine = kangaroo(plain, folders[adapter], method, **spec)
    got = engine.generate(prompts, params)
    for p, e, g in zip(prompts, expected, got, strict=True):
        assert g.accepted_tokens <= g.draft_tokens
        if assert_same_greedy(reference_model, p, e, g) and e.logprobs is not None:
            assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    s = engine.last_stats
    assert s.accepted_tokens == sum(g.accepted_tokens for g in got) == sum(s.source_accepted.values())
    assert s.draft_tokens == sum(g.draft_tokens for g in got) == sum(s.source_drafts.values())
    assert set(s.source_drafts) <= ({"kangaroo", "lookup"} if method == "hybrid" else {"kangaroo"})


def test_hybrid_takes_lookup_where_it_matches_and_kangaroo_elsewhere(engines):
    """One sample's prompt holds every token once, so lookup (down to 1-grams) always matches; the other's holds
    three: per step, the first drafts from lookup and the second from the adapter, both verified in the same
    forward, their counters apart."""
    plain, folders = engines
    plain.max_batch = 16  # both samples in every step (the hypothesis test leaves it anywhere in 1..16)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [list(range(3, 384)), [40, 41, 42]]
    spec = {"confidence_threshold": 0.0, "num_speculative_tokens": 4, "draft_threshold": 0.0, "prompt_lookup_min": 1}
    engine = kangaroo(plain, folders["full"], "hybrid", **spec)
    propose, seen = engine.proposer.propose, []

    def watch(batch, cache):  # keep each step's proposal
        seen.append(propose(batch, cache))
        return seen[-1]

    engine.proposer.propose = watch
    got = engine.generate(prompts, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in plain.generate(prompts, params)]
    first = got[0].token_ids[0]
    assert seen[0].sources == ["lookup", "kangaroo"] and len(seen[0].drafts[1]) == 4
    assert seen[0].drafts[0] == list(range(first + 1, first + 5))  # what followed the last token in the prompt
    s = engine.last_stats
    assert s.source_drafts["lookup"] > 0 and s.source_drafts["kangaroo"] > 0
    assert 0 <= s.source_accepted.get("lookup", 0) <= s.source_drafts["lookup"]


def test_hybrid_leaves_lookup_where_its_drafts_are_kept_less_often_than_kangaroos():
    """Every context matches (lookup proposes 7 8 5 6), and the acceptance rates decide: lookup where its rate is at
    least Kangaroo's (a tie included: both start at one prior), the adapter's drafting elsewhere."""

    class Recorder:  # stands in for the Kangaroo drafter: keeps what the hybrid hands it
        max_steps = 4

        def run(self, batch, cache, given, caps):
            self.given, self.caps = given, caps
            return Proposal([g + [0] * c for g, c in zip(given, caps, strict=True)])

    rates = {"lookup": [0.9, 0.3, 0.5], "kangaroo": [0.6, 0.6, 0.5]}
    batch = Batch(
        read_contexts=lambda: [[5, 6, 7, 8, 5, 6]] * 3,
        slots=[0, 1, 2],
        caps=[4, 4, 4],
        rates=rates.__getitem__,
        threshold=0.25,
        afford=lambda lengths, rates, deep: lengths,
    )
    kg = Recorder()
    proposal = Hybrid(kg, PromptLookup(max_ngram=2, min_ngram=2)).propose(batch, None)
    assert proposal.sources == ["lookup", "kangaroo", "lookup"]
    assert kg.given == [[7, 8, 5, 6], [], [7, 8]]  # lookup's drafts sized by its own rate (0.5 ** 3 < 0.25)
    assert kg.caps == [0, 4, 0]


@pytest.mark.parametrize("method", ["kangaroo", "hybrid"])
@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 6}])
def test_sampled_kangaroo_follows_the_plain_distribution(tmp_path, params, method):
    """The 2nd generated token on a 12-token vocabulary, sampled with Kangaroo's (or the hybrid's) drafts, fits the
    exact distribution computed from the model (chi-square, p > 0.001). The hybrid's first draft comes from lookup
    where the first token is one of the prompt's (1-grams match) and from the adapter otherwise."""
    from transformers import AutoModelForCausalLM

    from fot.speculative.verify import probabilities

    vocab, prompt, n = 12, [3, 7, 1, 4], 3000
    folder = save_tiny(tmp_path / "v12", "llama", vocab_size=vocab)
    params = SamplingParams(max_tokens=3, ignore_eos=True, **params)  # the 2nd token comes from a verified draft
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = probabilities(hf(torch.tensor([prompt])).logits[0, -1], params)
        p2 = probabilities(hf(torch.tensor([[*prompt, a] for a in range(vocab)])).logits[:, -1], params)
    exact = (p1[:, None] * p2).sum(0)
    plain = Engine.from_pretrained(folder, dtype="float32", max_batch=256, seed=2)
    adapter = random_adapter(tmp_path / "ad", plain.model, 1)
    engine = kangaroo(plain, adapter, method, confidence_threshold=0.0, prompt_lookup_min=1)
    outs = engine.generate([prompt] * n, params)
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).float()
    big = exact * n >= 5
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    expected = torch.cat([exact[big] * n, (exact[~big] * n).sum(0, keepdim=True)])
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 32.9
    assert 0 < engine.last_stats.accepted_tokens < engine.last_stats.draft_tokens
    assert set(engine.last_stats.source_drafts) == ({"kangaroo", "lookup"} if method == "hybrid" else {"kangaroo"})


def test_adapter_for_another_base_model_is_refused(tmp_path, tiny_llama_dir):
    other = Transformer.from_pretrained(save_tiny(tmp_path / "other", "llama", seed=1))
    folder = random_adapter(tmp_path / "ad", other, 1)
    plain = Engine.from_pretrained(tiny_llama_dir, dtype="float32")
    with pytest.raises(ModelError, match="trained for base model"):
        kangaroo(plain, folder)
    with pytest.raises(ModelError, match="no Kangaroo adapter"):
        kangaroo(plain, tmp_path / "nowhere")
    for method in ("kangaroo", "hybrid"):  # no adapter named: the shipped one for this model, and there is none
        shipped = r"\(shipped: qwen2.5-coder-1.5b, smollm2-135m\)"
        with pytest.raises(ModelError, match=r"no Kangaroo adapter is shipped for this model " + shipped):
            Engine(plain.model, plain.tokenizer, speculative={"method": method})
    with pytest.raises(InvalidRequestError):
        Engine(plain.model, plain.tokenizer, speculative={"method": "kangaroo", "layout": "padded"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("threshold", "0.4"), ("threshold", None), ("threshold", True), ("threshold", 1.5), ("threshold", -0.1)]
    + [("max_steps", 0), ("max_steps", 2.0), ("max_steps", True), ("max_steps", None), ("max_steps", "6")],
)
def test_an_adapter_config_s_bad_threshold_or_max_steps_is_refused_at_load(tmp_path, tiny_llama_dir, key, value):
    """Such values loaded, and the first decode then failed with TypeError, aborting the whole batch."""
    model = Transformer.from_pretrained(tiny_llama_dir)
    folder = random_adapter(tmp_path / "ad", model, 1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelError, match=rf"{key} .* is not"):
        load_adapter(folder, model)


def test_train_adapter_checkpoints_resumes_and_is_lossless(tmp_path, tiny_llama_dir):
    out = tmp_path / "adapter"
    kw = dict(exit_layer=2, prompts=20, new_tokens=12, batch_size=6, draft_vocab=200, progress=False)
    train_adapter(str(tiny_llama_dir), out, epochs=1, **kw)
    first = json.loads((out / "adapter_config.json").read_text())
    assert first["exit_layer"] == 2 and len(first["draft_vocab"]) == 200 and first["base_model"] == str(tiny_llama_dir)
    checkpoint = torch.load(out / "work" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 0
    train_adapter(str(tiny_llama_dir), out, epochs=3, **kw)  # resumes at epoch 1 from the checkpoint
    assert torch.load(out / "work" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    trained = json.loads((out / "adapter_config.json").read_text())["training"]
    assert trained["epochs"] == 3 and 0 <= trained["holdout_top1_agreement"] <= 1 and trained["final_loss"] > 0
    # a finished run asked again keeps its own loss (it reported 0.0); fewer epochs than trained is refused
    train_adapter(str(tiny_llama_dir), out, epochs=3, **kw)
    assert json.loads((out / "adapter_config.json").read_text())["training"]["final_loss"] == trained["final_loss"]
    with pytest.raises(InvalidRequestError, match="already trained 3 epochs, more than epochs=2"):
        train_adapter(str(tiny_llama_dir), out, epochs=2, **kw)
    # other options never resume this checkpoint (it did, whatever the learning rate or data): they start over
    with pytest.warns(UserWarning, match="other options; starting over"):
        train_adapter(str(tiny_llama_dir), out, epochs=1, lr=5e-4, **kw)
    assert torch.load(out / "work" / "checkpoint.pt", weights_only=False)["epoch"] == 0
    plain = Engine.from_pretrained(tiny_llama_dir, dtype="float32", max_batch=8)
    prompts, params = [[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in kangaroo(plain, out).generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]


def test_another_model_trained_into_the_same_folder_makes_its_own_data(tmp_path, tiny_llama_dir):
    """The data and teacher files were named by the options only: a second model trained into the same folder
    distilled from the first model's answers and hidden states, and its adapter named the second model."""
    from conftest import save_tiny

    other = save_tiny(tmp_path / "other", "llama", seed=1)
    out = tmp_path / "adapter"
    kw = dict(exit_layer=2, prompts=10, new_tokens=8, batch_size=5, draft_vocab=None, epochs=1, progress=False)
    for model in (tiny_llama_dir, other):
        train_adapter(str(model), out, **kw)
    assert len(list((out / "work").glob("data-*"))) == 2 and len(list((out / "work").glob("teacher-*"))) == 2
    assert json.loads((out / "adapter_config.json").read_text())["base_model"] == str(other)


@pytest.mark.parametrize(
    "bad",
    [{"batch_size": 0}, {"lr": 0}, {"lr": -1e-3}, {"lr": float("nan")}, {"epochs": 0}, {"prompts": 5},
     {"draft_vocab": -1}, {"exit_layer": 0}],
)  # fmt: skip
def test_bad_training_options_are_refused_before_any_work(bad):
    """Refused before the model is even looked for: the model named here does not exist."""
    with pytest.raises(InvalidRequestError, match=next(iter(bad))):
        train_adapter("no-such-model", progress=False, **bad)


def test_train_on_the_search_prompts_with_a_bf16_teacher(tmp_path, tiny_llama_dir):
    """The search's own prompts (fot.trees.workload) and a bf16 teacher: the data file says both, and the adapter
    (trained in fp32) is lossless on the bf16 model it was made from."""
    from fot.trees.workload import search_prompts

    out = tmp_path / "adapter"
    train_adapter(
        str(tiny_llama_dir), out, exit_layer=1, prompts=14, prompt_set=search_prompts, new_tokens=8, epochs=1,
        batch_size=4, draft_vocab=None, dtype="bfloat16", progress=False,
    )  # fmt: skip
    [data] = [f.name for f in (out / "work").glob("data-*")]
    assert re.fullmatch(r"data-[0-9a-f]{8}-search_prompts-bfloat16-0-14-8\.jsonl", data), data
    assert {t.dtype for t in load_file(out / "adapter.safetensors").values()} == {torch.bfloat16}  # half the file
    plain = Engine.from_pretrained(tiny_llama_dir, dtype="bfloat16", max_batch=8)
    prompts, params = [[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in kangaroo(plain, out).generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]


def test_training_data_is_generated_in_chunks_and_resumes(tmp_path, tiny_llama_dir):
    """A run stopped mid-way (here: a torn last line and a partial chunk) keeps its whole chunks and generates only
    the rest again; the result equals one uninterrupted run."""
    from fot.speculative.adapter_training import generate_data, training_prompts

    engine = Engine.from_pretrained(tiny_llama_dir, dtype="float32", max_batch=8)
    chats, path = training_prompts(10), tmp_path / "data.jsonl"
    whole = generate_data(engine, chats, path, 6, 0, False, chunk=4)
    assert len(whole) == 10 and path.read_text().count("\n") == 10
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:6]) + "\n" + lines[6][:5])  # 6 whole lines (a chunk and a half), one torn
    before = engine.stats.requests
    assert generate_data(engine, chats, path, 6, 0, False, chunk=4) == whole
    assert engine.stats.requests - before == 6  # chunks 2 and 3 again, not chunk 1
    assert generate_data(engine, chats, path, 6, 0, False, chunk=4) == whole and engine.stats.requests - before == 6


def test_the_teacher_runs_once_per_sequence_and_resumes_from_its_files(tmp_path, tiny_llama_dir):
    """The teacher's view of each sequence equals a pass over that sequence alone; it is saved chunk by chunk, and a
    second run reads the files without the model."""
    from fot.speculative.adapter_training import collate, teacher_batch, teacher_data

    model = Transformer.from_pretrained(tiny_llama_dir)
    seqs = [[5 + i + j for j in range(4 + 3 * i)] for i in range(7)]
    data = teacher_data(model, seqs, 1, 8, tmp_path / "t", False, chunk=3, batch=2)
    assert sorted(f.name for f in (tmp_path / "t").iterdir()) == [
        "0-3.safetensors",
        "3-3.safetensors",
        "6-1.safetensors",
    ]
    for seq, got in zip(seqs, data, strict=True):
        alone = teacher_batch(model, [seq], 1, 8)
        assert torch.allclose(got["hidden"], alone["hidden"], atol=1e-5) and torch.equal(
            got["idx"].long(), alone["idx"]
        )
    again = teacher_data(None, seqs, 1, 8, tmp_path / "t", False, chunk=3, batch=2)  # type: ignore[arg-type]
    batch = collate(again[2:5])
    assert batch["lengths"].tolist() == [10, 13, 16] and batch["idx"].dtype == torch.long
    assert torch.equal(batch["hidden"], torch.cat([d["hidden"] for d in data[2:5]]))


def test_adapter_fits_its_base_model_in_either_precision(tiny_llama_dir, tmp_path):
    """The base-model fingerprint is taken at bf16 precision: an adapter made on the fp32 model loads on the same
    model run in bf16 (the default on CPUs with native bf16), and still refuses another model."""
    folder = random_adapter(tmp_path / "ad", Transformer.from_pretrained(tiny_llama_dir), 2)
    for dtype in (torch.float32, torch.bfloat16):
        drafter = load_adapter(folder, Transformer.from_pretrained(tiny_llama_dir, dtype))
        assert next(drafter.adapter.parameters()).dtype == dtype
    with pytest.raises(ModelError, match="trained for base model"):
        load_adapter(
            folder, Transformer.from_pretrained(save_tiny(tmp_path / "other", "llama", seed=1), torch.bfloat16)
        )


def test_kangaroo_inside_vllm_is_lossless(served_model_dir, tmp_path, monkeypatch):
    """vLLM's custom_class speculative method with our proposer: vLLM verifies, so greedy output must be vLLM's
    plain output; an untrained adapter with threshold 0 drafts at every step and is mostly rejected. The
    proposer's cache starts at 1 row of 8 positions here, so it grows in both while it drafts."""
    import asyncio

    from fot.decoding import Request
    from fot.decoding.kangaroo_vllm import KANGAROO_VLLM, KangarooProposer
    from fot.decoding.vllm import VLLMBackend
    from fot.speculative.cache import KVCache

    monkeypatch.setattr(KangarooProposer, "START_LEN", 8)
    grown = []
    real = KVCache.grow
    monkeypatch.setattr(KVCache, "grow", lambda self, *size: grown.append(size) or real(self, *size))

    folder = random_adapter(tmp_path / "ad", Transformer.from_pretrained(served_model_dir), 1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "threshold": 0.0}))
    reqs = [Request.make(p, max_tokens=20, ignore_eos=True) for p in ["The quick brown fox", "12 + 30 =", "Paris"]]
    outs, usage = {}, {}
    for name, kw in [("plain", {}), ("kangaroo", {"speculative_config": KANGAROO_VLLM, "kangaroo_adapter": folder})]:
        backend = VLLMBackend(model=str(served_model_dir), max_model_len=512, **kw)
        outs[name] = [c.token_ids for c in asyncio.run(backend.generate(reqs))]
        usage[name] = backend.usage
        asyncio.run(backend.close())
    assert "FOT_KANGAROO_ADAPTER" not in os.environ  # set while vLLM built the proposer, not left for the next one
    assert outs["kangaroo"] == outs["plain"]
    assert grown[0][0] > 1 and grown[-1][1] > 8  # rows and positions, as the requests needed
    assert usage["kangaroo"].draft_tokens > 0 and usage["plain"].draft_tokens == 0
    assert usage["kangaroo"].accepted_tokens <= usage["kangaroo"].draft_tokens


def test_shipped_adapter_on_the_embedded_model_is_lossless_and_accepts():
    plain = Engine.from_pretrained("default", dtype="float32", max_batch=4)
    fixed = SpeculativeConfig(method="kangaroo", cost_aware=False)  # drafting must not hang on this machine's timings
    engine = Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=4, speculative=fixed)
    chats = [[{"role": "user", "content": f"Tom has {n} boxes with 12 apples each. How many apples?"}] for n in (3, 5)]
    params = SamplingParams(max_tokens=48)
    assert [o.token_ids for o in engine.generate(chats, params)] == [o.token_ids for o in plain.generate(chats, params)]
    assert engine.last_stats.accept_length > 1.1


def test_a_vllm_kangaroo_adapter_is_checked_before_vllm_loads(tmp_path):
    """The option was ignored without the Kangaroo proposer, and a folder without an adapter was found only after
    vLLM had loaded the model."""
    from fot.decoding.kangaroo_vllm import KANGAROO_VLLM
    from fot.decoding.vllm import VLLMBackend

    with pytest.raises(InvalidRequestError, match="kangaroo_adapter needs speculative_config=KANGAROO_VLLM"):
        VLLMBackend(model="/no/such/model", kangaroo_adapter=tmp_path)
    with pytest.raises(ModelError, match="no Kangaroo adapter in"):
        VLLMBackend(model="/no/such/model", speculative_config=KANGAROO_VLLM, kangaroo_adapter=tmp_path)
