"""MCTSr (Monte Carlo Tree Self-Refine, Zhang et al. 2024): the reasoning tree FoT uses for math.

A node is a whole candidate answer. The tree starts with the model's first answer and a dummy "I don't know."
(which keeps the search from anchoring on the first answer). One rollout:
  select  the expandable node with the highest UCT = Q + c * sqrt(ln(N_parent + 1) / (N_node + eps)), c = 1.4;
          a node is expandable while it has fewer than `max_children` children and none of them beats it
          (the reference code's rule);
  refine  ask for a strict critique of its answer, then for an improved answer given the critique: a new child;
  reward  the model grades the new answer 0..100 as a strict critic, `reward_samples` times; rewards above
          `reward_ceiling` lose `reward_penalty` (MCTSr's full-score suppression); Q = (min + mean) / 2;
  update  along the path up, N += 1 and a parent's Q becomes (Q_parent + best child Q) / 2.
The tree's answer is the answer of its highest-Q node that has one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

from fot.decoding.base import Completion, Request
from fot.tasks.base import Task
from fot.trees.base import Generate, TreeGraph

# dynamic self-correction hook: (gen, problem, the answers' requests and completions) -> (text to keep, text it
# replaced or None) for each
Corrector = Callable[[Generate, str, list[Request], list[Completion]], Awaitable[list[tuple[str | None, str | None]]]]

DUMMY = "I don't know."
ANSWER = "Solve the problem step by step, then finish with 'The answer is X.'\n\n{example}Problem: {problem}"
CRITIQUE = (
    "Problem: {problem}\nAnswer: {answer}\n\nCritique this answer strictly: point out every mistake in its "
    "reasoning and arithmetic. Do not solve the problem yourself."
)
REFINE = (
    "Problem: {problem}\nPrevious answer: {answer}\nCritique: {critique}\n\nWrite a better answer step by step, "
    "fixing the mistakes, then finish with 'The answer is X.'"
)
REWARD = (
    "Problem: {problem}\nAnswer: {answer}\n\nYou are a strict grader. Grade the answer from 0 to 100 (100 = fully "
    "correct). Reply with 'Score: N' only."
)


class MCTSrConfig(BaseModel):
    """MCTSr's knobs, with the paper's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rollouts: int = Field(4, ge=0, le=64)
    exploration: float = Field(1.4, ge=0)  # c in UCT
    max_children: int = Field(3, ge=1, le=64)
    reward_samples: int = Field(3, ge=1, le=64)  # a request's n: refused before any work, not mid-search
    reward_ceiling: int = 95
    reward_penalty: int = 50
    eps: float = 1e-6
    max_tokens: int = Field(384, ge=1)
    reward_tokens: int = Field(16, ge=1)  # a grade is 'Score: N': a few tokens, never a second essay
    temperature: float = Field(0.7, ge=0)


def parse_reward(text: str) -> float | None:
    """The grade in a reward answer ("Score: 85", or the first number 0..100), or None if there is none."""
    m = re.search(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", text, re.I) or re.search(r"(-?\d+(?:\.\d+)?)", text)
    if not m:
        return None
    return min(100.0, max(0.0, float(m.group(1))))


class MCTSr:
    """One MCTSr tree over one (possibly augmented) problem statement. Call `start`, then `step` per rollout."""

    kind = "mctsr"
    corrections = 0  # its repairs are the forest's corrector's, counted there

    def __init__(
        self,
        task: Task,
        problem: str,
        config: MCTSrConfig | None = None,
        *,
        example: str = "",
        seed: int = 0,
        corrector: Corrector | None = None,
        name: str = "mctsr",
    ):
        self.task, self.problem, self.example, self.seed = task, problem, example, seed
        self.config = config or MCTSrConfig()
        self.corrector = corrector
        self.tree = TreeGraph(name)
        self.root = self.tree.add(text=problem, kind="problem", q=0.0, visits=0, answer=None, failed=False)
        self.rollouts_done = 0

    # ---- requests -------------------------------------------------------------------------------------------
    def request(
        self, template: str, *, n: int = 1, logprobs: bool = False, max_tokens: int | None = None, **fields: str
    ) -> Request:
        c = self.config
        self.seed += 1  # every request of the tree gets its own seed: reproducible, and samples differ
        content = template.format(problem=self.problem, **fields)
        return Request.make(
            [{"role": "user", "content": content}],
            n=n,
            max_tokens=max_tokens or c.max_tokens,
            temperature=c.temperature,
            seed=self.seed,
            logprobs=logprobs,
        )

    def add_answer(self, parent: int, text: str | None, corrected_from: str | None = None, **attrs) -> int:
        """A candidate answer node; `corrected_from` keeps the text that self-correction replaced."""
        if corrected_from is not None:
            attrs["corrected_from"] = corrected_from
        failed = text is None
        answer = None if failed or text == DUMMY else self.task.extract(text)
        return self.tree.add(
            parent, text=text or "", kind="answer", answer=answer, q=0.0, visits=0, rewards=[], failed=failed, **attrs
        )

    async def answers(self, gen: Generate, requests: list[Request]) -> list[tuple[str | None, str | None]]:
        """Generate answers (with log-probs, so self-correction can judge them): (text, the text self-correction
        replaced or None) each; failed requests give None."""
        done = await gen(requests)
        if self.corrector is not None:
            return await self.corrector(gen, self.problem, requests, done)
        return [(c.text if c.ok else None, None) for c in done]

    # ---- the algorithm --------------------------------------------------------------------------------------
    async def start(self, gen: Generate) -> None:
        """The first answer and the dummy, both graded."""
        [(first, before)] = await self.answers(gen, [self.request(ANSWER, example=self.example, logprobs=True)])
        nodes = [self.add_answer(self.root, first, before), self.add_answer(self.root, DUMMY)]
        await self.reward(gen, nodes)

    async def step(self, gen: Generate) -> None:
        """One rollout: select, critique, refine, grade, update."""
        node = self.select()
        if node is None:
            return
        answer = self.tree[node]["text"]
        [critique] = await gen([self.request(CRITIQUE, answer=answer)])
        if not critique.ok:  # the backend failed on this node: mark it and go on
            self.tree[node]["failed"] = True
            return
        refine = self.request(REFINE, answer=answer, critique=critique.text, logprobs=True)
        [(text, before)] = await self.answers(gen, [refine])
        child = self.add_answer(node, text, before, critique=critique.text)
        await self.reward(gen, [child])
        self.rollouts_done += 1

    async def reward(self, gen: Generate, nodes: list[int]) -> None:
        c = self.config
        live = [n for n in nodes if not self.tree[n]["failed"]]
        reqs = [
            self.request(REWARD, answer=self.tree[n]["text"], n=c.reward_samples, max_tokens=c.reward_tokens)
            for n in live
        ]
        done = await gen(reqs) if reqs else []
        for node, comp in zip(live, done, strict=True):
            rewards = [r for r in (parse_reward(t) for t in comp.texts) if r is not None] if comp.ok else []
            rewards = [r - c.reward_penalty if r > c.reward_ceiling else r for r in rewards]
            self.tree[node]["rewards"] = rewards
            self.tree[node]["q"] = (min(rewards) + sum(rewards) / len(rewards)) / 2 if rewards else 0.0
            self.backpropagate(node)

    def backpropagate(self, node: int) -> None:
        self.tree[node]["visits"] += 1
        parent = self.tree.parent(node)
        while parent is not None:
            p = self.tree[parent]
            p["visits"] += 1
            if parent != self.root:
                best = max(self.tree[ch]["q"] for ch in self.tree.children(parent))
                p["q"] = (p["q"] + best) / 2
            parent = self.tree.parent(parent)

    def expandable(self, node: int) -> bool:
        attrs, kids = self.tree[node], self.tree.children(node)
        if attrs["failed"] or node == self.root:
            return False
        return len(kids) < self.config.max_children and all(self.tree[k]["q"] <= attrs["q"] for k in kids)

    def uct(self, node: int) -> float:
        attrs = self.tree[node]
        parent_visits = self.tree[self.tree.parent(node)]["visits"]
        explore = math.sqrt(math.log(parent_visits + 1) / (attrs["visits"] + self.config.eps))
        return attrs["q"] + self.config.exploration * explore

    def select(self) -> int | None:
        """The expandable node with the highest UCT (ties: the older node)."""
        candidates = [n for n in self.tree.nodes() if self.expandable(n)]
        return max(candidates, key=lambda n: (self.uct(n), -n)) if candidates else None

    # ---- results --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.rollouts_done >= self.config.rollouts or self.select() is None

    def score(self) -> float:
        """How promising the tree is (sparse activation ranks trees by it): its best Q."""
        return max((self.tree[n]["q"] for n in self.tree.nodes() if n != self.root), default=0.0)

    def answer_node(self) -> int | None:
        """The node whose answer is the tree's: the highest Q among those with one (ties: the older)."""
        answered = [n for n in self.tree.nodes() if self.tree[n]["answer"] is not None]
        return max(answered, key=lambda n: (self.tree[n]["q"], -n)) if answered else None

    def answer(self) -> str | None:
        node = self.answer_node()
        return None if node is None else self.tree[node]["answer"]

    def remaining_steps(self) -> int:
        return self.config.rollouts - self.rollouts_done
