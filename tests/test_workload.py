"""The search's own prompts, for training a drafter: every kind the search asks, rendered, reproducible."""

from __future__ import annotations

import random
import re

from fot.tasks import MathTask
from fot.tasks.checks import check_arithmetic
from fot.trees.workload import math_problem, search_prompts


def text(p) -> str:
    return p if isinstance(p, str) else p[0]["content"]


def test_search_prompts_cover_every_kind_and_are_reproducible():
    prompts = search_prompts(70, seed=3)
    assert prompts == search_prompts(70, seed=3) and prompts != search_prompts(70, seed=4)
    texts = [text(p) for p in prompts]
    marks = ["Solve the problem step by step", "Critique this answer", "Write a better answer", "strict grader",
             "make 24", "Possible next steps", "can reach 24"]  # fmt: skip
    for mark in marks:
        assert sum(mark in t for t in texts) == 10, mark
    assert sum("Example problem:" in t for t in texts) == 5  # every other first answer has a worked example
    assert not any(re.search(r"\{[a-z_]*\}", t) for t in texts)  # every template field filled


def test_worked_answers_are_right_or_slip_in_their_last_step():
    """The project's own arithmetic check agrees: a right answer has no wrong statement, a slipped one exactly one,
    its last."""
    math = MathTask()
    for i in range(60):
        problem, answer = math_problem(random.Random(i), slips=0.0)
        assert check_arithmetic(problem, answer).failure is None, answer
        assert math.extract(answer) == re.findall(r"= (\d+)", answer)[-1]  # the answer says what its last step says
        problem, slipped = math_problem(random.Random(i), slips=1.0)
        failure = check_arithmetic(problem, slipped).failure
        assert failure is not None and failure.at > slipped.rindex("="), slipped  # the last statement
