"""Pydantic models at the library's edges: sampling and speculative-decoding options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fot.errors import InvalidRequestError


class SamplingParams(BaseModel):
    """How to decode one request. Unknown options are rejected, so a typo never silently does nothing.

    `n` samples per request are served by the backends (fot.decoding); the engine itself takes n=1.
    temperature 0 means greedy (argmax). top_k 0 and top_p 1 switch those filters off. With `logprobs`
    the log-probability of each generated token under the model's own (unscaled) distribution is returned;
    the search uses their mean to decide when an answer needs self-correction.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: int = Field(1, ge=1, le=1024)  # each sample is a sequence in the engine: n=10**7 would fill the memory
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: tuple[str, ...] = ()
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: bool = False
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _valid(self) -> SamplingParams:
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and self.seed + self.n > 2**63:  # sample j is seeded seed + j
            raise ValueError(f"seed + n - 1 must be below 2**63 (sample j is seeded seed + j), got seed {self.seed}")
        return self

    @classmethod
    def make(cls, params: SamplingParams | dict | None = None, **overrides: object) -> SamplingParams:
        """Build from a dict, an instance or keywords, turning validation failures into our own error."""
        if params is not None and not isinstance(params, SamplingParams | dict):
            raise InvalidRequestError(f"sampling parameters are SamplingParams or a dict, not {type(params).__name__}")
        try:
            if isinstance(params, SamplingParams):
                if not overrides:
                    return params
                params = params.model_dump()
            return cls(**{**(params or {}), **overrides})
        except ValidationError as e:
            raise InvalidRequestError(f"invalid sampling parameters: {e}") from None


class SpeculativeConfig(BaseModel):
    """Speculative decoding in the native engine (EMS-SD). Lossless: greedy output is plain greedy output, sampled
    output follows the plain distribution (rejection sampling).

    `num_speculative_tokens` caps the draft per sample and step. Each sample drafts only as far as its recent
    acceptance rate r makes the j-th token likely to be kept (r ** j >= `draft_threshold`; 0 always drafts the
    maximum; Kangaroo's own drafts stop on their confidence instead), and `max_draft_tokens_per_step` caps the
    drafts of the whole batch in one step, keeping the likeliest: once a batch is compute-bound (early on a CPU) a
    rejected draft token costs as much as a kept one.
    With `cost_aware` the engine also measures how a forward's time grows with its token count on this machine and
    keeps as many of the likeliest draft tokens as maximise the expected tokens per second
    (see `drafters.draft_lengths`).
    `layout="padded"` is the paper's vanilla baseline, for comparison only.

    `method="kangaroo"` drafts with the model's own first layers + a trained adapter (fot.speculative.kangaroo):
    each sample drafts until the draft's top-1 probability drops below `confidence_threshold` or after
    `num_speculative_tokens` tokens. `method="hybrid"` takes prompt lookup's draft where a sample's context has a
    match and lookup's drafts are kept at least as often as Kangaroo's there, and Kangaroo's otherwise
    (fot.speculative.hybrid).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Literal["prompt_lookup", "kangaroo", "hybrid"] = "prompt_lookup"
    num_speculative_tokens: int = Field(8, ge=1, le=64)
    adapter: str | None = None  # kangaroo, hybrid: adapter folder; None = the one shipped for this model
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)  # kangaroo's early exit; None = adapter's
    draft_threshold: float = Field(0.25, ge=0.0, le=1.0)
    max_draft_tokens_per_step: int | None = Field(None, ge=1)
    cost_aware: bool = True
    prompt_lookup_max: int = Field(3, ge=1)
    prompt_lookup_min: int = Field(2, ge=1)  # 1-gram matches are frequent and mostly wrong (measured)
    layout: Literal["unpadded", "padded"] = "unpadded"

    @model_validator(mode="after")
    def _ngram_range(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if self.method != "prompt_lookup" and self.layout == "padded":
            raise ValueError(f"{self.method} runs in the unpadded layout only")
        if self.method == "prompt_lookup" and (self.adapter is not None or self.confidence_threshold is not None):
            raise ValueError("adapter and confidence_threshold are Kangaroo's (kangaroo, hybrid), not prompt_lookup's")
        return self

    @classmethod
    def make(cls, config: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """None -> no speculation; a method name or a dict -> a config; bad values -> InvalidRequestError."""
        if config is None or isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, str | dict):
            raise InvalidRequestError(f"a speculative config is a method name or a dict, got {type(config).__name__}")
        try:
            return cls(method=config) if isinstance(config, str) else cls(**config)
        except ValidationError as e:
            raise InvalidRequestError(f"invalid speculative config: {e}") from None
