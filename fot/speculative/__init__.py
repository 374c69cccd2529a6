"""The native PyTorch engine: model, per-sample KV cache, batched generation (speculative decoding builds on it)."""

from fot.speculative.cache import KVCache, Step
from fot.speculative.engine import Engine, EngineStats, Generation
from fot.speculative.model import ModelArgs, Transformer

__all__ = ["Engine", "EngineStats", "Generation", "KVCache", "ModelArgs", "Step", "Transformer"]
