"""Pydantic models at the library's edges: sampling options (more configs join as the search lands)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fot.errors import InvalidRequestError


class SamplingParams(BaseModel):
    """How to decode one request. Unknown options are rejected, so a typo never silently does nothing.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 switch those filters off. With `logprobs`
    the log-probability of each generated token under the model's own (unscaled) distribution is returned;
    the search uses their mean to decide when an answer needs self-correction.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _no_empty_stop(self) -> SamplingParams:
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self

    @classmethod
    def make(cls, params: SamplingParams | dict | None = None, **overrides: object) -> SamplingParams:
        """Build from a dict, an instance or keywords, turning validation failures into our own error."""
        try:
            if isinstance(params, SamplingParams):
                if not overrides:
                    return params
                params = params.model_dump()
            return cls(**{**(params or {}), **overrides})
        except ValidationError as e:
            raise InvalidRequestError(f"invalid sampling parameters: {e}") from None
