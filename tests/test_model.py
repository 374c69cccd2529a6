"""The native model computes what transformers computes, over flat ragged batches and any range of layers."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from fot.errors import ModelError
from fot.speculative.cache import KVCache
from fot.speculative.model import ModelArgs, Transformer, rope_frequencies
from fot.speculative.weights import Checkpoint
from tests.conftest import save_tiny

ATOL = 1e-4  # fp32; the two implementations differ only in summation order


def new_cache(model: Transformer, n_slots: int, max_len: int = 128) -> KVCache:
    a = model.args
    return KVCache(a.n_layers, n_slots, a.n_kv_heads, max_len, a.head_dim, model.dtype)


def hf_logits(folder, ids: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("packed", [False, True])
def test_ragged_prefill_matches_transformers(tiny_model_dir, packed):
    model = Transformer.from_pretrained(tiny_model_dir)
    if packed:
        model.pack_weights()
    prompts = [[5, 17, 42, 9, 100, 7, 3], [11], [250, 251, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    cache = new_cache(model, 3)
    step = cache.plan([0, 1, 2], [len(p) for p in prompts])
    with torch.no_grad():
        logits = model(torch.tensor([t for p in prompts for t in p]), step, cache)
    offset = 0
    for p in prompts:
        ref = hf_logits(tiny_model_dir, p)
        torch.testing.assert_close(logits[offset : offset + len(p)], ref, atol=ATOL, rtol=0)
        offset += len(p)


def test_incremental_decode_matches_full_forward(tiny_model_dir):
    """Feeding tokens in uneven chunks per sample (each slot at its own length) gives the full-sequence logits."""
    model = Transformer.from_pretrained(tiny_model_dir)
    seqs = [list(range(3, 30)), list(range(40, 51)), list(range(100, 120))]
    chunks = [[5, 1, 1, 7, 13], [2, 2, 3, 1, 3], [1, 9, 4, 4, 2]]  # per sample, tokens fed at each step
    cache = new_cache(model, 3)
    got = [[] for _ in seqs]
    fed = [0, 0, 0]
    with torch.no_grad():
        for step_no in range(5):
            counts = [c[step_no] for c in chunks]
            tokens = torch.tensor([t for s, f, n in zip(seqs, fed, counts, strict=False) for t in s[f : f + n]])
            logits = model(tokens, cache.plan([0, 1, 2], counts), cache)
            cache.advance([0, 1, 2], counts)
            for i, part in enumerate(logits.split(counts)):
                got[i].append(part)
                fed[i] += counts[i]
    for s, parts in zip(seqs, got, strict=False):
        torch.testing.assert_close(torch.cat(parts), hf_logits(tiny_model_dir, s), atol=ATOL, rtol=0)


def test_any_memory_layout_of_the_attention_output(tiny_model_dir, monkeypatch):
    """A GPU's attention kernels return [rows, heads, n, dim] laid out as [rows, n, heads, dim]; the model must take
    that layout too (a `view` of it failed on CUDA)."""
    model = Transformer.from_pretrained(tiny_model_dir)
    prompts = [[5, 17, 42, 9, 100, 7, 3], [11, 12], [250, 251, 1, 2]]
    tokens = torch.tensor([t for p in prompts for t in p])

    def prefill() -> torch.Tensor:
        cache = new_cache(model, 3)
        with torch.no_grad():
            return model(tokens, cache.plan([0, 1, 2], [len(p) for p in prompts]), cache)

    want = prefill()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def strided(*args, **kw) -> torch.Tensor:
        return sdpa(*args, **kw).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strided)
    assert not strided(*[torch.zeros(2, 3, 4, 8)] * 3).is_contiguous()
    torch.testing.assert_close(prefill(), want, atol=0, rtol=0)


def test_layer_ranges_compose(tiny_llama_dir):
    """Running layers [0, k) then [k, L) on the saved hidden state equals running all layers (Kangaroo's split)."""
    model = Transformer.from_pretrained(tiny_llama_dir)
    tokens = torch.tensor([5, 6, 7, 8, 9, 10])
    a, b = new_cache(model, 1), new_cache(model, 1)
    with torch.no_grad():
        full = model(tokens, a.plan([0], [6]), a)
        step = b.plan([0], [6])
        shallow = model.run_layers(model.embed(tokens), step, b, 0, 2)
        split = model.logits(model.run_layers(shallow, step, b, 2, None))
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_and_attention_bias(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = save_tiny(tmp_path, "llama", rope_parameters=rope, attention_bias=True, tie_word_embeddings=False)
    model = Transformer.from_pretrained(folder)
    assert model.args.o_bias and not model.args.tie_embeddings
    ids = list(range(10, 110))
    cache = new_cache(model, 1)
    with torch.no_grad():
        logits = model(torch.tensor(ids), cache.plan([0], [len(ids)]), cache)
    torch.testing.assert_close(logits, hf_logits(folder, ids), atol=ATOL, rtol=0)


def test_bf16_close_to_fp32(tiny_llama_dir):
    ids = torch.tensor([5, 17, 42, 9, 100])
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer.from_pretrained(tiny_llama_dir, dtype)
        cache = new_cache(model, 1)
        with torch.no_grad():
            out[dtype] = model(ids, cache.plan([0], [5]), cache)
    assert out[torch.bfloat16].dtype == torch.float32  # logits always come back in fp32
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max() < 0.25


def test_unsupported_configs_fail_clearly():
    with pytest.raises(ModelError, match="supported: llama, qwen2"):
        ModelArgs.from_hf({"model_type": "gpt2"})
    cfg = {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ModelError, match="RoPE type 'yarn'"):
        ModelArgs.from_hf(cfg)


def test_the_older_rope_type_spelling_scales_as_the_newer_one():
    """Older Llama configs spell it "type": it was checked, then dropped, so no scaling ran and outputs were wrong."""
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 1}
    base |= {"num_attention_heads": 4, "intermediate_size": 16}
    old = ModelArgs.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = ModelArgs.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert torch.equal(rope_frequencies(old), rope_frequencies(new))
    assert torch.equal(rope_frequencies(new), rope_frequencies(ModelArgs.from_hf(base)) / 4)


@pytest.mark.parametrize(("packed", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
@pytest.mark.parametrize(
    ("weight", "shape"),
    [("lm_head.weight", (364, 64)), ("model.layers.1.self_attn.k_proj.weight", (48, 64))],
)
def test_a_weight_of_another_shape_than_the_config_s_is_refused(tmp_path, packed, dtype, weight, shape):
    """A head of 364 rows for 384 tokens loaded packed (its missing rows zero) and generated; unpacked it failed
    inside torch. k_proj with more rows than config.json's KV heads sum to a fused q/k/v of another size."""
    folder = save_tiny(tmp_path, "qwen2")
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[weight] = torch.randn(shape)
    save_file(tensors, str(file), metadata)
    with pytest.raises(ModelError, match=rf"{weight} has shape \[{shape[0]}, {shape[1]}\]"):
        Transformer.from_pretrained(folder, dtype, pack=packed)


@pytest.mark.parametrize("header", [b"[]", b"null", b"42", b'"x"'])
def test_a_safetensors_header_that_is_json_but_no_object_is_refused(tmp_path, header):
    """It raised AttributeError (`.items()` of a list) instead of the library's ModelError."""
    file = tmp_path / "model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelError, match="not an object"):
        Checkpoint([file])
