"""Tiny random-weight Llama and Qwen2 checkpoints (saved by transformers itself) and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from servers import free_port, vllm_server
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42. Refine the answer step by step.",
    "Game of 24: 4 + 6 = 10 (left: 1 10 4). What is the capital of France? Paris.",
] * 20
VOCAB = 384


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def tiny_config(kind: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(**{"tie_word_embeddings": True, "rms_norm_eps": 1e-5, **common, **overrides})
    return Qwen2Config(**{"tie_word_embeddings": False, "rms_norm_eps": 1e-6, **common, **overrides})


def save_tiny(folder: Path, kind: str, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM
    model = cls(tiny_config(kind, **overrides)).float().eval()
    with torch.no_grad():  # larger than the default init so that logits are far from uniform (fewer argmax ties)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    """transformers' own model on the tiny checkpoint: the independent judge of a greedy choice."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def assert_same_greedy(reference, prompt: list[int], want, got, tol: float = 1e-4) -> bool:
    """Greedy outputs must be equal token for token. The one allowed difference is an exact tie: where the
    reference's two best logits differ by less than float error (`tol`), both are correct greedy choices, a
    different batch shape may round either way, and the sequences cannot be compared past that point (random tiny
    models do produce such ties). Returns True when the outputs were equal, so callers can compare the rest."""
    if got.token_ids == want.token_ids:
        assert got.finish_reason == want.finish_reason
        return True
    assert len(got.token_ids) == len(want.token_ids), "one output stopped where the other did not"
    k = next(i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids, strict=True)) if a != b)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + want.token_ids[:k]])).logits[0, -1].double()
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    pair = {got.token_ids[k], want.token_ids[k]}
    assert gap < tol and pair == set(top.indices.tolist()), f"token {k} differs: {pair}, top-2 gap {gap:.2e}"
    return False


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with head size 32 (vLLM's CPU attention needs 32..512), served by every backend."""
    return save_tiny(
        tmp_path_factory.mktemp("served"), "llama", hidden_size=128, intermediate_size=256, num_attention_heads=4
    )


@pytest.fixture(scope="session")
def vllm_url(served_model_dir, tmp_path_factory):
    """A real `vllm serve` on loopback for the whole session; killed at the end."""
    port = free_port()
    with vllm_server(served_model_dir, port, tmp_path_factory.mktemp("logs") / "vllm-serve.log"):
        yield f"http://127.0.0.1:{port}/v1"
