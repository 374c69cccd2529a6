"""Decoding backends behind one async contract: `await backend.generate(requests) -> list[Completion]`.

backend = make_backend("native")            # the project's engine, EMS-SD prompt lookup on
backend = make_backend("vllm")              # vLLM in process (pip install 'fot[vllm]')
backend = make_backend("openai", base_urls=["http://host-a:8000/v1", "http://host-b:8000/v1"], model="m")
"""

from __future__ import annotations

from typing import Literal

from fot.decoding.base import Backend, BackendError, BaseBackend, Completion, Output, Request, Usage, run_sync
from fot.errors import InvalidRequestError

BackendKind = Literal["native", "vllm", "openai"]


def make_backend(kind: BackendKind | str = "native", **config) -> BaseBackend:
    """A backend by name; `config` holds the fields of that backend's config model."""
    if kind == "native":
        from fot.decoding.native import NativeBackend

        return NativeBackend(**config)
    if kind == "vllm":
        from fot.decoding.vllm import VLLMBackend

        return VLLMBackend(**config)
    if kind == "openai":
        from fot.decoding.openai import OpenAIBackend

        return OpenAIBackend(**config)
    raise InvalidRequestError(f"unknown backend {kind!r}; use native, vllm or openai")


__all__ = [
    "Backend",
    "BackendError",
    "BaseBackend",
    "Completion",
    "Output",
    "Request",
    "Usage",
    "make_backend",
    "run_sync",
]
