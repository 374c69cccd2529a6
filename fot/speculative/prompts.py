"""Prompts into token ids, the same way for every backend that tokenizes locally, and a model folder's end ids."""

from __future__ import annotations

import json
from pathlib import Path

from fot.errors import InvalidRequestError
from fot.tasks.base import check_unicode

ChatMessage = dict[str, str]
Prompt = str | list[ChatMessage] | list[int]


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
