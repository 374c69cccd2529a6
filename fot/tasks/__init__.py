"""Tasks: how to parse a problem, extract and compare answers, and check rules, for each kind of problem."""

from __future__ import annotations

import re

from fot.errors import InvalidRequestError
from fot.tasks.base import Task, majority_key, require_text
from fot.tasks.game24 import Game24Task, Step, parse_numbers
from fot.tasks.math import MathTask

TASKS: dict[str, type[MathTask] | type[Game24Task]] = {"math": MathTask, "game24": Game24Task}

# Four whole numbers with separators or brackets around them, and nothing else of substance.
_FOUR_NUMBERS = re.compile(r"[\[(]?\s*\d+(?:(?:\s*[,;]\s*|\s+)\d+){3}\s*[\])]?\s*\.?")


def get_task(name: str) -> Task:
    """The task called `name` ('math' or 'game24'); a typo fails with the list of known tasks."""
    if not isinstance(name, str) or name.strip().lower() not in TASKS:
        raise InvalidRequestError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name.strip().lower()]()


def detect_task(problem: str) -> str:
    """'game24' when the problem is just four numbers (e.g. '4 6 1 10' or '[4, 6, 1, 10]'), else 'math'."""
    text = require_text(problem, "a problem")
    if _FOUR_NUMBERS.fullmatch(text):
        try:
            parse_numbers(text)
        except InvalidRequestError:
            return "math"
        return "game24"
    return "math"


__all__ = ["Game24Task", "MathTask", "Step", "Task", "detect_task", "get_task", "majority_key"]
