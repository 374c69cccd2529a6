"""The one interface between the engine and its drafters (as vLLM's v1 spec_decode proposers).

At every decode step the engine tells the proposer what the batch is (`Batch`) and gets back each sample's draft
(`Proposal`); then one forward verifies every sample's last token and drafts. A proposer owns three things that
differ between drafters:
  prefill  the prompt forward (Kangaroo also fills its adapter's KV cache there);
  propose  the drafts, each sample its own number (0 allowed), within the engine's caps and what pays here;
  verify   the verification forward, from the input tokens, or from layer k over hidden states the drafting kept.

`TokenProposer` serves every drafter that only proposes token ids (prompt lookup, or none: plain decoding);
Kangaroo (fot.speculative.kangaroo) and the hybrid (fot.speculative.hybrid) draft with the model's own layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from torch import Tensor

from fot.errors import InvalidRequestError
from fot.speculative.cache import KVCache, Layout
from fot.speculative.drafters import Drafter, draft_lengths
from fot.speculative.model import Transformer


@dataclass
class Batch:
    """What a proposer knows of the batch at one decode step, sample by sample. The contexts are built only when a
    drafter reads them: plain decoding never copies them."""

    read_contexts: Callable[[], list[list[int]]]  # prompt + generated tokens; the last one is the token fed now
    slots: list[int]  # cache slots
    caps: list[int]  # at most this many draft tokens (num_speculative_tokens, and the sample's max_tokens left)
    rates: Callable[[str], list[float]]  # a drafter's recent acceptance rate in each sample (by drafter name)
    threshold: float  # a token drafter drafts token j only while rate ** j >= threshold
    # of n[i] possible draft tokens, each kept with probability about rate[i] ** j, how many pay for their verification
    # (and, for the samples flagged in the third list, for the draft passes that make them one token at a time)
    afford: Callable[[list[int], list[float], list[bool]], list[int]]

    @cached_property
    def contexts(self) -> list[list[int]]:
        return self.read_contexts()


@dataclass
class Proposal:
    """Each sample's draft; `hidden` holds the layer-k states of every token to verify (the fed token, then the
    draft, sample after sample) when verification starts there; `sources` names each sample's drafter; `passes`
    the rows of each forward the drafting ran (Kangaroo's shallow passes), what the engine's cost model times."""

    drafts: list[list[int]]
    sources: list[str] = field(default_factory=list)
    hidden: Tensor | None = None
    passes: list[int] = field(default_factory=list)


class Proposer(Protocol):
    extra_layers: int  # KV layers the proposer keeps in the engine's cache, after the model's own

    def pack(self) -> None:
        """Put the proposer's own weights on the CPU kernels' packed layout (the engine packs the model's)."""
        ...

    def prefill(self, tokens: Tensor, step: Layout, cache: KVCache, last: Tensor) -> Tensor:
        """The logits at rows `last` of a forward over new prompt tokens."""
        ...

    def propose(self, batch: Batch, cache: KVCache) -> Proposal: ...

    def verify(self, tokens: Tensor, step: Layout, cache: KVCache, proposal: Proposal) -> Tensor:
        """The logits of every fed token (`tokens`: each sample's last token and its draft, flat)."""
        ...


class TokenProposer:
    """A drafter of token ids (None: plain decoding) behind the engine's interface: the model runs whole."""

    extra_layers = 0

    def __init__(self, model: Transformer, drafter: Drafter | None, name: str = "tokens"):
        self.model, self.drafter, self.name = model, drafter, name

    def pack(self) -> None:
        """Nothing of its own to pack."""

    def prefill(self, tokens: Tensor, step: Layout, cache: KVCache, last: Tensor) -> Tensor:
        return self.model(tokens, step, cache, last)

    def propose(self, batch: Batch, cache: KVCache) -> Proposal:
        if self.drafter is None:
            return Proposal([[] for _ in batch.slots])
        rates = batch.rates(self.name)
        limits = draft_lengths(rates, batch.caps, batch.threshold)
        drafts = self.drafter.propose(batch.contexts, limits)
        for d, k in zip(drafts, limits, strict=True):
            if len(d) > k:
                raise InvalidRequestError(f"the drafter proposed {len(d)} tokens where at most {k} were allowed")
        keep = batch.afford([len(d) for d in drafts], rates, [False] * len(drafts))
        return Proposal([d[:k] for d, k in zip(drafts, keep, strict=True)], [self.name] * len(drafts))

    def verify(self, tokens: Tensor, step: Layout, cache: KVCache, proposal: Proposal) -> Tensor:
        return self.model(tokens, step, cache)
