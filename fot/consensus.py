"""Consensus-guided expert decision (CGED): how a forest turns its trees' answers into one.

majority  one answer holds more than half of the trees: take it (the forest may stop early on it);
plurality otherwise the single most common answer;
expert    a tie at the top (or several candidates and no plurality): the model, asked as an expert, picks among
          the candidates;
fallback  no tree has an answer, or the expert says "I don't know": a chain-of-thought answer, checked and repaired
          by the forest's self-correction as the trees' answers are; without a corrector (Game of 24), an answer
          that fails the task's check is no answer. With `samples` > 1 (our extension, `fallback_samples`), that
          many sampled chains answer instead, and their answers vote together with the trees': where the forest
          cannot agree, more evidence, not one more opinion.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel

from fot.decoding.base import Request
from fot.tasks.base import Task, grouped_votes
from fot.trees.base import Generate
from fot.trees.cot import chain_of_thought, self_consistency
from fot.trees.mctsr import Corrector

EXPERT = (
    "Problem: {problem}\n\nCandidate final answers:\n{candidates}\n\nWhich candidate is correct? Reply with its "
    "number only, or 0 if you don't know."
)


class Decision(BaseModel):
    answer: str | None
    votes: dict[str, int]  # representative answer -> trees that gave an equivalent one
    method: Literal["majority", "plurality", "expert", "fallback"]
    confidence: float  # share of the trees behind the answer (0 for a fallback)


def majority(ranked: list[tuple[str, int]], trees: int) -> str | None:
    """The answer held by more than half of all `trees` (unanswered trees count against it), else None; `ranked`
    is `grouped_votes` of their answers."""
    return ranked[0][0] if ranked and ranked[0][1] * 2 > trees else None


async def decide(
    task: Task,
    problem: str,
    answers: list[str | None],
    gen: Generate,
    seed: int = 0,
    max_tokens: int = 384,
    corrector: Corrector | None = None,
    samples: int = 1,
    temperature: float = 0.7,
) -> Decision:
    """The forest's answer from its trees' `answers`. `gen` is the forest's metered generate: an expert or
    fallback request that fails fails the search, not only this decision. `samples` chains (at `temperature`)
    make the fallback when more than one."""
    ranked = await grouped_votes(task, answers)
    votes = dict(ranked)
    n = max(len(answers), 1)
    if majority(ranked, len(answers)) is not None:
        return Decision(answer=ranked[0][0], votes=votes, method="majority", confidence=ranked[0][1] / n)
    if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
        return Decision(answer=ranked[0][0], votes=votes, method="plurality", confidence=ranked[0][1] / n)
    if ranked:
        tied = [a for a, c in ranked if c == ranked[0][1]]
        pick = await ask_expert(gen, problem, tied)
        if pick is not None:
            return Decision(answer=pick, votes=votes, method="expert", confidence=votes[pick] / n)

    def ruled(answer: str | None) -> str | None:
        """Nothing checked it (Game of 24 has no corrector): an answer the task's rule rejects is none."""
        rejected = answer is not None and corrector is None and task.check(problem, f"Answer: {answer}")
        return None if rejected else answer

    if samples == 1:
        answer, _ = await chain_of_thought(gen, task, problem, seed=seed, max_tokens=max_tokens, corrector=corrector)
        return Decision(answer=ruled(answer), votes=votes, method="fallback", confidence=0.0)
    _, sampled, _ = await self_consistency(
        gen, task, problem, samples, temperature=temperature, seed=seed, max_tokens=max_tokens, corrector=corrector
    )
    pooled = await grouped_votes(task, [*answers, *map(ruled, sampled)])  # a tie that remains: the answer seen first
    return Decision(answer=pooled[0][0] if pooled else None, votes=votes, method="fallback", confidence=0.0)


async def ask_expert(gen: Generate, problem: str, candidates: list[str]) -> str | None:
    """The candidate the expert names (greedy), or None when it answers 0, nothing usable, or fails."""
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    prompt = EXPERT.format(problem=problem, candidates=listing)
    [done] = await gen([Request.make([{"role": "user", "content": prompt}], max_tokens=8, temperature=0.0)])
    m = re.search(r"\d+", done.text) if done.ok else None
    k = int(m.group()) if m else 0
    return candidates[k - 1] if 1 <= k <= len(candidates) else None
