"""Tasks: how to parse a problem, extract and compare answers, and check rules, for each kind of problem."""

from __future__ import annotations

import re

from fot.errors import InvalidRequestError
from fot.tasks.base import Task, majority_key, require_text
from fot.tasks.game24 import Game24Task, Step, parse_numbers
from fot.tasks.math import MathTask

TASKS: dict[str, type[MathTask] | type[Game24Task]] = {"math": MathTask, "game24": Game24Task}

# Only numbers (two or more, signed or not) with separators or brackets around them, or four joined by dashes:
# what a Game-of-24 puzzle looks like, right or wrong.
_NUMBERS_ONLY = re.compile(r"[\[(]?\s*-?\d+(?:(?:\s*[,;]\s*|\s+)-?\d+)+\s*[\])]?\s*\.?|\d+(?:\s*-\s*\d+){3}")


def get_task(name: str) -> Task:
    """The task called `name` ('math' or 'game24'); a typo fails with the list of known tasks."""
    if not isinstance(name, str) or name.strip().lower() not in TASKS:
        raise InvalidRequestError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name.strip().lower()]()


def detect_task(problem: str) -> str:
    """'game24' when the problem is just numbers ('4 6 1 10', '[4, 6, 1, 10]', '4-6-1-10'), else 'math'. Numbers
    that do not make a puzzle ('1 2 3', '-4 6 1 10') are an error that says so, never silently a math problem."""
    text = require_text(problem, "a problem")
    if not _NUMBERS_ONLY.fullmatch(text):
        return "math"
    try:
        parse_numbers(text)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{e}; to solve {text!r} as arithmetic instead, pass task='math'") from None
    return "game24"


__all__ = ["Game24Task", "MathTask", "Step", "Task", "detect_task", "get_task", "majority_key"]
