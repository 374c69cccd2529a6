"""What the engine hands back: each finished request (`Generation`) and the usage counters (`EngineStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel


class Generation(BaseModel):
    """One finished request."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    forward_passes: int  # that this request took part in (its prefill included)
    draft_tokens: int = 0  # proposed by the drafter
    accepted_tokens: int = 0  # drafts that verification kept, up to a stop
    logprobs: list[float] | None = None  # of each generated token, under the model's unscaled distribution

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def accept_length(self) -> float:
        """Tokens gained per decoding step after the prefill (1.0 without speculation)."""
        steps = self.forward_passes - 1
        return 1.0 + self.accepted_tokens / steps if steps else 1.0

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


@dataclass
class EngineStats:
    """Usage counters (every backend reports the same ones): `Engine.stats` over the engine's lifetime,
    `Engine.last_stats` for the last `generate` call (one batch)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    decode_steps: int = 0  # (sample, decode forward) pairs: how often some sample was advanced after its prefill
    draft_tokens: int = 0
    accepted_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose cache entries were copied (an earlier prompt, the store)
    cancelled: int = 0  # samples dropped before they finished (their caller went away)
    prefill_seconds: float = 0.0  # wall time in prefill forwards, and in everything else (decode, draft, verify)
    decode_seconds: float = 0.0
    source_drafts: dict[str, int] = field(default_factory=dict)  # draft tokens by the drafter that made them
    source_accepted: dict[str, int] = field(default_factory=dict)  # (the hybrid has two: "lookup", "kangaroo")

    @property
    def accept_length(self) -> float:
        """Mean tokens gained per sample per decoding step (EMS-SD's and Kangaroo's "accepted length")."""
        return 1.0 + self.accepted_tokens / self.decode_steps if self.decode_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def by_source(self) -> dict[str, list[int]]:
        """Draft tokens [proposed, kept] by the drafter that made them (the hybrid has two)."""
        return {k: [n, self.source_accepted.get(k, 0)] for k, n in self.source_drafts.items()}

    def snapshot(self) -> EngineStats:
        """A copy of the counters now, for `since` (the per-source counts copied too, not shared)."""
        return replace(self, source_drafts=dict(self.source_drafts), source_accepted=dict(self.source_accepted))

    def since(self, earlier: EngineStats) -> EngineStats:
        """What was counted after `earlier` (a `snapshot` taken then)."""

        def minus(now, then):
            if isinstance(now, dict):
                return {k: v - then.get(k, 0) for k, v in now.items() if v != then.get(k, 0)}
            return now - then

        return EngineStats(**{name: minus(getattr(self, name), getattr(earlier, name)) for name in vars(self)})
