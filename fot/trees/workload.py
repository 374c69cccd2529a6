"""The search's own prompts over made-up problems: the text a drafter (a Kangaroo adapter) should learn, since it
is what a search asks the model for. Math first answers (alone and with a worked example, as FoT's trees get
them), critiques, refines and grades of answers that are sometimes wrong (as a search's are), and Game-of-24 chains
of thought, step proposals and evaluations. The problems are generated here: a lossless drafter cannot change an
answer, so overlap with an evaluation set would not matter, but none is drawn from one.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fot.data import NAMES, THINGS
from fot.trees.cot import GAME24
from fot.trees.mctsr import ANSWER, CRITIQUE, REFINE, REWARD
from fot.trees.tot import PROPOSE, VALUE

Prompt = str | list[dict[str, str]]


def _bags(r: random.Random) -> tuple[str, str, int]:
    name, thing, a, b, c = r.choice(NAMES), r.choice(THINGS), r.randint(2, 12), r.randint(3, 20), r.randint(1, 9)
    problem = f"{name} has {a} bags with {b} {thing} in each bag and gives away {c}. How many {thing} are left?"
    return problem, f"{name} has {a} * {b} = {a * b} {thing}. After giving away {c}: {a * b} - {c} = {{}}.", a * b - c


def _change(r: random.Random) -> tuple[str, str, int]:
    name, price, n = r.choice(NAMES), r.randint(2, 9), r.randint(2, 8)
    paid = (price * n // 10 + 1) * 10
    problem = f"Pens cost {price} dollars each. {name} buys {n} pens and pays with {paid} dollars. What is the change?"
    return (
        problem,
        f"The pens cost {n} * {price} = {price * n} dollars, so the change is {paid} - {price * n} = {{}}.",
        (paid - price * n),
    )


def _speed(r: random.Random) -> tuple[str, str, int]:
    v, h, m = r.randint(30, 90), r.randint(2, 6), r.randint(10, 50)
    problem = f"A car drives {v} km per hour for {h} hours, then {m} km more. How far does it drive in total?"
    return (
        problem,
        f"In {h} hours it drives {v} * {h} = {v * h} km. With {m} km more: {v * h} + {m} = {{}} km.",
        (v * h + m),
    )


def _percent(r: random.Random) -> tuple[str, str, int]:
    price, pct = r.randint(4, 40) * 10, r.choice([10, 20, 25, 30, 50])
    off = price * pct // 100
    problem = f"A coat costs {price} dollars and is sold at {pct}% off. What is the sale price?"
    return (
        problem,
        f"The discount is {pct}% of {price} = {off} dollars, so the price is {price} - {off} = {{}}.",
        (price - off),
    )


def _share(r: random.Random) -> tuple[str, str, int]:
    name, thing, k, each = r.choice(NAMES), r.choice(THINGS), r.randint(2, 6), r.randint(3, 15)
    problem = f"{name} shares {k * each} {thing} equally among {k} friends. How many {thing} does each friend get?"
    return problem, f"Each friend gets {k * each} / {k} = {{}} {thing}.", each


PROBLEMS: list[Callable[[random.Random], tuple[str, str, int]]] = [_bags, _change, _speed, _percent, _share]


def math_problem(r: random.Random, slips: float = 1 / 3) -> tuple[str, str]:
    """A word problem and a worked answer: right, or (with probability `slips`) off by a little in its last step,
    as a search's answers often are."""
    problem, steps, result = r.choice(PROBLEMS)(r)
    said = result + (r.choice([-2, -1, 1, 2]) if r.random() < slips else 0)
    return problem, f"{steps.format(said)} The answer is {said}."


def game24_numbers(r: random.Random) -> str:
    return " ".join(str(x) for x in sorted(r.randint(1, 13) for _ in range(4)))


def search_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` prompts of the search's kinds, in turn: first answers (every other one with a worked example),
    critiques, refines, grades, Game-of-24 chains of thought, proposals and evaluations."""
    r = random.Random(seed)
    out: list[Prompt] = []
    for i in range(n):
        problem, answer = math_problem(r)
        kind = i % 7
        if kind == 0:
            example = ""
            if i % 2:
                other, worked = math_problem(r, slips=0.0)  # a shipped example is right
                example = f"Example problem: {other}\nExample answer: {worked}\n\n"
            content = ANSWER.format(problem=problem, example=example)
        elif kind == 1:
            content = CRITIQUE.format(problem=problem, answer=answer)
        elif kind == 2:
            critique = "Check the last step: the arithmetic there may be wrong."
            content = REFINE.format(problem=problem, answer=answer, critique=critique)
        elif kind == 3:
            content = REWARD.format(problem=problem, answer=answer)
        elif kind == 4:
            out.append(GAME24.format(problem=game24_numbers(r)))
            continue
        elif kind == 5:
            out.append(PROPOSE.format(numbers=game24_numbers(r)))
            continue
        else:
            numbers = game24_numbers(r).split()[: r.randint(2, 3)]
            out.append(VALUE.format(numbers=" ".join(numbers)))
            continue
        out.append([{"role": "user", "content": content}])
    return out
