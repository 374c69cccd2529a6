"""Tree-of-Thoughts BFS (Yao et al. 2023): the reasoning tree FoT uses for Game of 24.

A node is a state: the numbers left and how each was made. Each level:
  propose  the model lists possible next steps for every state in the frontier ("4 + 6 = 10 (left: 1 4 10)");
  check    every step is recomputed exactly (fractions): with self-correction on, a step whose claimed result or
           "left" list is wrong is repaired (recomputed) and one that uses numbers it does not have is dropped;
           without it, any step that fails the check is dropped;
  value    the model judges each new state sure / likely / impossible, `value_samples` times (20 / 1 / 0.001);
  keep     the best `beam` states.
Once two numbers are left the last step is solved exactly, without the model. The answer is the expression of a
state that reached 24, always re-checked with the task's exact checker.
"""

from __future__ import annotations

import re
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field

from fot.decoding.base import Request
from fot.tasks.game24 import (
    Game24Task,
    apply_step,
    check_expression,
    correct_step,
    fmt,
    join_last,
    parse_numbers,
    parse_step,
)
from fot.trees.base import Generate, TreeGraph
from fot.trees.cot import NEXT_PUZZLE

PROPOSE = """Use two of the numbers and one of + - * / to make a new number. List possible next steps, one per line.
Input: 2 8 8 14
Possible next steps:
2 + 8 = 10 (left: 8 10 14)
8 / 2 = 4 (left: 4 8 14)
14 + 2 = 16 (left: 8 8 16)
2 * 8 = 16 (left: 8 14 16)
8 - 2 = 6 (left: 6 8 14)
14 - 8 = 6 (left: 2 6 8)
Input: {numbers}
Possible next steps:
"""
VALUE = """Evaluate if the given numbers can reach 24 (sure/likely/impossible)
10 14
10 + 14 = 24
sure
11 12
11 + 12 = 23
12 - 11 = 1
impossible
4 4 10
4 * 10 - 4 = 36
(10 - 4) * 4 = 24
sure
1 3 3
1 * 3 * 3 = 9
impossible
{numbers}
"""
VALUES = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}
_VERDICT = re.compile(r"\b(?:sure|likely|impossible)\b")


class ToTConfig(BaseModel):
    """ToT BFS knobs, with the paper's defaults (beam 5, 3 value samples)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    beam: int = Field(5, ge=1, le=64)
    value_samples: int = Field(3, ge=1, le=64)  # a request's n: refused before any work, not mid-search
    propose_tokens: int = Field(160, ge=1)
    value_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, ge=0)


def parse_value(text: str) -> float:
    """The first verdict, as a whole word ("unsure" is none); no verdict counts as 'impossible'. The model goes on
    to judge states of its own after its verdict, so a later one is not about this state."""
    m = _VERDICT.search(text.lower())
    return VALUES[m.group()] if m else VALUES["impossible"]


class ToT:
    """One ToT BFS tree over one ordering of a Game-of-24 puzzle. Call `start`, then `step` per level."""

    kind = "tot"

    def __init__(
        self,
        task: Game24Task,
        problem: str,
        config: ToTConfig | None = None,
        *,
        seed: int = 0,
        correct: bool = True,
        name: str = "tot",
    ):
        self.task, self.seed, self.correct = task, seed, correct
        self.config = config or ToTConfig()
        self.numbers = tuple(Fraction(x) for x in parse_numbers(problem))
        self.tree = TreeGraph(name)
        root = self.tree.add(numbers=[fmt(x) for x in self.numbers], exprs=[fmt(x) for x in self.numbers])
        self.tree[root].update(step="", value=0.0, answer=None, failed=False)
        self.frontier = [root]
        self.corrections = 0  # steps repaired by the exact check
        self.rejected = 0  # steps dropped by it

    def state(self, node: int) -> tuple[tuple[Fraction, ...], tuple[str, ...]]:
        a = self.tree[node]
        return tuple(Fraction(x) for x in a["numbers"]), tuple(a["exprs"])

    def request(self, template: str, numbers: str, *, n: int, max_tokens: int) -> Request:
        self.seed += 1
        params = {"n": n, "max_tokens": max_tokens, "temperature": self.config.temperature, "seed": self.seed}
        return Request.make(template.format(numbers=numbers), stop=(NEXT_PUZZLE,), **params)

    async def start(self, gen: Generate) -> None:
        """The first level. Sparse activation ranks trees by their best state's value, and a bare root gives every
        tree the same 0: ranking then would keep the first trees by their index and drop the rest unexplored."""
        await self.step(gen)

    async def step(self, gen: Generate) -> None:
        """One BFS level: propose, check (and correct), value, keep the beam; two numbers left -> solved exactly."""
        parents = [n for n in self.frontier if len(self.tree[n]["numbers"]) > 2]
        if not parents:
            return
        c = self.config
        proposals = await gen(
            [
                self.request(PROPOSE, " ".join(self.tree[p]["numbers"]), n=1, max_tokens=c.propose_tokens)
                for p in parents
            ]
        )
        children = []
        for parent, comp in zip(parents, proposals, strict=True):
            if not comp.ok:
                self.tree[parent]["failed"] = True
                continue
            children += self.expand(parent, comp.text)
        to_value = [ch for ch in children if len(self.tree[ch]["numbers"]) > 2]
        reqs = [
            self.request(VALUE, " ".join(self.tree[ch]["numbers"]), n=c.value_samples, max_tokens=c.value_tokens)
            for ch in to_value
        ]
        for child, comp in zip(to_value, await gen(reqs) if reqs else [], strict=True):
            self.tree[child]["value"] = sum(parse_value(t) for t in comp.texts) if comp.ok else 0.0
        for child in children:
            if len(self.tree[child]["numbers"]) == 2:
                expr = join_last(*zip(*self.state(child), strict=True))
                self.tree[child]["value"] = VALUES["sure"] * c.value_samples if expr else 0.0
                if expr and check_expression([int(x) for x in self.numbers], expr):
                    self.tree[child]["answer"] = expr
        self.frontier = sorted(children, key=lambda ch: (-self.tree[ch]["value"], ch))[: c.beam]
        for child in set(children) - set(self.frontier):
            self.tree[child]["pruned"] = True  # outside the beam: BFS does not expand it

    def expand(self, parent: int, text: str) -> list[int]:
        """Children of `parent` from the proposed steps, each checked exactly; duplicates of a state are merged."""
        numbers, exprs = self.state(parent)
        seen, kids = set(), []
        for line in text.splitlines():
            step = parse_step(line)
            if step is None:
                continue
            new, errors = apply_step(numbers, step)
            if new is None or (errors and not self.correct):
                self.rejected += 1
                continue
            key = tuple(sorted(new))
            if key in seen:  # a state already proposed: no node, so no correction to count
                continue
            seen.add(key)
            line = wrote = line.strip()
            if errors:
                self.corrections += 1
                line = correct_step(numbers, step)
            kids.append(self.child(parent, numbers, exprs, step, line, new[-1]))
            if errors:
                self.tree[kids[-1]]["corrected_from"] = wrote
        return kids

    def child(self, parent: int, numbers, exprs, step, line: str, result: Fraction) -> int:
        """The state after `step`: the two operands replaced by the exact result (`apply_step`'s), with its
        expression."""
        rest_n, rest_e = list(numbers), list(exprs)
        ea = rest_e.pop(rest_n.index(step.a))
        rest_n.remove(step.a)
        eb = rest_e.pop(rest_n.index(step.b))
        rest_n.remove(step.b)
        node = self.tree.add(parent, step=line, value=0.0, answer=None, failed=False)
        self.tree[node]["numbers"] = [fmt(x) for x in rest_n + [result]]
        self.tree[node]["exprs"] = rest_e + [f"({ea} {step.op} {eb})"]
        return node

    @property
    def done(self) -> bool:
        return all(len(self.tree[n]["numbers"]) <= 2 for n in self.frontier) or not self.frontier

    def score(self) -> float:
        return max((self.tree[n]["value"] for n in self.frontier), default=0.0)

    def answer_node(self) -> int | None:
        """The first state solved exactly, if any."""
        return next((n for n in self.tree.nodes() if self.tree[n]["answer"]), None)

    def answer(self) -> str | None:
        node = self.answer_node()
        return None if node is None else self.tree[node]["answer"]

    def remaining_steps(self) -> int:
        """BFS levels left: a state of n numbers has n - 2 steps before its last two."""
        return max(len(self.tree[self.frontier[0]]["numbers"]) - 2, 0) if self.frontier else 0
