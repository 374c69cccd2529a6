"""Forest-of-Thought's input augmentation: each tree of a forest sees a differently augmented input, so that the
trees do not all reason the same way. Math: tree i > 0 gets the i-th most similar worked example of a shipped pool
(TF-IDF cosine), and with `program_trees` the last trees are asked to answer with a program; Game of 24: tree
i > 0 sees the numbers in a shuffled order. Any `Augmenter` can replace them."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Protocol


class Augmenter(Protocol):
    def __call__(self, problem: str, trees: int, rng: random.Random) -> list[tuple[str, str]]:
        """(problem text, worked example or "") for each tree; tree 0 sees the problem as given."""
        ...


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


class ExampleRetriever:
    """Math augmentation: tree i > 0 gets the i-th most similar worked example of the pool (TF-IDF cosine)."""

    def __init__(self, examples: Sequence[dict] | None = None):
        if examples is None:
            lines = resources.files("fot.data").joinpath("math_examples.jsonl").read_text().splitlines()
            examples = [json.loads(line) for line in lines if line.strip()]
        self.examples = list(examples)
        docs = [Counter(_words(e["problem"])) for e in self.examples]
        df = Counter(w for d in docs for w in d)
        self.idf = {w: math.log((1 + len(docs)) / (1 + c)) + 1 for w, c in df.items()}
        self.vectors = [self.vector(d) for d in docs]

    def vector(self, counts: Counter) -> dict[str, float]:
        v = {w: c * self.idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def ranked(self, problem: str) -> list[dict]:
        q = self.vector(Counter(_words(problem)))
        sims = [sum(q.get(w, 0.0) * x for w, x in v.items()) for v in self.vectors]
        order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))
        return [self.examples[i] for i in order]

    def __call__(self, problem: str, trees: int, rng: random.Random) -> list[tuple[str, str]]:
        ranked = self.ranked(problem)
        out = [(problem, "")]
        for i in range(1, trees):
            e = ranked[(i - 1) % len(ranked)]
            out.append((problem, f"Example problem: {e['problem']}\nExample answer: {e['solution']}\n\n"))
        return out


@cache
def shipped_examples() -> ExampleRetriever:
    """The retriever over the shipped example pool, read and indexed once per process, not once per problem."""
    return ExampleRetriever()


PROGRAM = (
    "\n\nWrite a short Python program that computes the answer, show what it prints in an ```output block, then "
    "finish with 'The answer is X.'"
)


def program_of_thought(inputs: list[tuple[str, str]], k: int) -> list[tuple[str, str]]:
    """Program-of-thought augmentation: the last `k` trees (never tree 0) are asked to answer with code, which the
    code check then runs, so that their arithmetic is the interpreter's."""
    first = max(len(inputs) - k, 1)
    return [(p + PROGRAM, ex) if i >= first else (p, ex) for i, (p, ex) in enumerate(inputs)]


def shuffle_numbers(problem: str, trees: int, rng: random.Random) -> list[tuple[str, str]]:
    """Game-of-24 augmentation: tree i > 0 sees the four numbers in a shuffled order."""
    numbers = problem.split()
    out = [(problem, "")]
    for _ in range(1, trees):
        order = numbers[:]
        rng.shuffle(order)
        out.append((" ".join(order), ""))
    return out
