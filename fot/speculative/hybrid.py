"""The hybrid drafter: for each sample at each step, prompt lookup's draft where the context has a match and
lookup's drafts have lately been kept at least as often as Kangaroo's, and Kangaroo's otherwise.

Where an answer copies its input (MCTSr's refine answers, a repaired answer's continuation), lookup proposes long
runs that are nearly free to make; where it does not (first answers, critiques), the adapter still drafts. Both
drafts are verified from layer k: a lookup draft goes through the shallow layers and the adapter with the sample's
last token, in the same pass as the Kangaroo samples' first step, so the adapter's KV cache stays whole. The
engine keeps their acceptance counters apart (`EngineStats.source_drafts` / `source_accepted`), and each sample's
acceptance rate of each: lookup's drafts are sized by how often lookup's drafts were kept, not Kangaroo's, and a
sample whose text matches its context everywhere but copies little (prose that repeats short phrases) is left to
the adapter, whose drafts are kept more often there: a one-token lookup draft in its place would waste the step.
"""

from __future__ import annotations

from torch import Tensor

from fot.speculative.cache import KVCache, Layout
from fot.speculative.drafters import PromptLookup, draft_lengths
from fot.speculative.kangaroo import KangarooDrafter
from fot.speculative.proposer import Batch, Proposal


class Hybrid:
    """Prompt lookup first where it does as well as Kangaroo, Kangaroo elsewhere; prefill and verification are
    Kangaroo's."""

    extra_layers = 1

    def __init__(self, kangaroo: KangarooDrafter, lookup: PromptLookup):
        self.kangaroo, self.lookup = kangaroo, lookup

    def pack(self) -> None:
        self.kangaroo.pack()

    def prefill(self, tokens: Tensor, step: Layout, cache: KVCache, last: Tensor) -> Tensor:
        return self.kangaroo.prefill(tokens, step, cache, last)

    def propose(self, batch: Batch, cache: KVCache) -> Proposal:
        kg, lookup_rates, kangaroo_rates = self.kangaroo, batch.rates("lookup"), batch.rates("kangaroo")
        limits = draft_lengths(lookup_rates, batch.caps, batch.threshold)
        # both start at the same prior, so lookup is tried first; the idle one's counts decay back to the prior
        limits = [k if lr >= kr else 0 for k, lr, kr in zip(limits, lookup_rates, kangaroo_rates, strict=True)]
        looked = self.lookup.propose(batch.contexts, limits)
        wanted = [len(d) if d else min(kg.max_steps, c) for d, c in zip(looked, batch.caps, strict=True)]
        rates = [lr if d else kr for d, lr, kr in zip(looked, lookup_rates, kangaroo_rates, strict=True)]
        # one budget over both kinds of draft, each at its own acceptance rate; Kangaroo's cost a pass per token
        keep = batch.afford(wanted, rates, [not d for d in looked])
        given = [d[:k] for d, k in zip(looked, keep, strict=True)]
        proposal = kg.run(batch, cache, given, [0 if d else k for d, k in zip(looked, keep, strict=True)])
        proposal.sources = ["lookup" if g else "kangaroo" for g in given]
        return proposal

    def verify(self, tokens: Tensor, step: Layout, cache: KVCache, proposal: Proposal) -> Tensor:
        return self.kangaroo.verify(tokens, step, cache, proposal)
