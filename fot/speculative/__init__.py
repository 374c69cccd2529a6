"""The native PyTorch engine: model, per-sample KV cache, batched generation and EMS-SD speculative decoding."""

from fot.speculative.cache import KVCache, Layout
from fot.speculative.drafters import Drafter, PromptLookup
from fot.speculative.engine import Engine
from fot.speculative.model import ModelArgs, Transformer
from fot.speculative.outputs import EngineStats, Generation

__all__ = [
    "Drafter",
    "Engine",
    "EngineStats",
    "Generation",
    "KVCache",
    "ModelArgs",
    "PromptLookup",
    "Layout",
    "Transformer",
]
