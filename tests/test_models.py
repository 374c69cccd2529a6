"""Model names and folders resolve clearly; the embedded model (converted by `make model`) answers sensibly."""

import json

import pytest

from fot.errors import ModelError
from fot.models import cache_dir, check_model_folder, resolve_model
from fot.speculative.engine import Engine


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="not a known name .*smollm2-135m"):
        resolve_model("no-such-model")


def test_folder_checks(tmp_path, tiny_llama_dir):
    assert resolve_model(tiny_llama_dir) == tiny_llama_dir
    with pytest.raises(ModelError, match="config.json is missing"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="'gpt_neox' is not supported; supported: llama, qwen2"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="safetensors"):
        check_model_folder(tmp_path)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FOT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    with pytest.raises(ModelError, match="fot prepare-model smollm2-135m"):
        resolve_model("default", prepare=False)


def test_embedded_model_answers_a_chat_prompt():
    engine = Engine.from_pretrained("default", max_batch=4)
    assert engine.model.args.n_layers == 30 and engine.model.args.vocab_size == 49152
    questions = ["What is the capital of France?", "What is 2 + 3? Answer with a number."]
    outs = engine.generate([[{"role": "user", "content": q}] for q in questions], {"max_tokens": 40})
    assert "Paris" in outs[0].text
    assert "5" in outs[1].text
    assert all(o.finish_reason == "stop" for o in outs)
