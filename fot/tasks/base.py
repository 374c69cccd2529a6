"""What the search needs to know about a kind of problem, with no model call: parse, extract, compare, check."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from fot.errors import InvalidRequestError
from fot.tasks.checks import Check


@runtime_checkable
class Task(Protocol):
    """One kind of problem. Pure Python and thread-safe: the search calls tasks from worker threads."""

    name: str
    tree: str  # the kind of reasoning tree that searches it in a forest: "mctsr" (free-form answers) or "tot"
    # rule checks that recompute an answer's claims and say where to repair it (fot.tasks.checks), by name;
    # "code" and "arithmetic" are switched by CorrectionConfig, and their counts are in SolveUsage
    checks: Mapping[str, Check]

    def parse(self, problem: str) -> str:
        """Validate and normalise the problem text, so a bad problem fails before any model call."""
        ...

    def extract(self, text: str) -> str | None:
        """The final answer of a model's text in canonical form, or None when the text gives none."""
        ...

    def equivalent(self, a: str, b: str) -> bool:
        """Whether two extracted answers are the same answer (votes are grouped by this)."""
        ...

    def check(self, problem: str, text: str) -> list[str]:
        """Rule violations of a full answer text; an empty list means it passes (drives self-correction)."""
        ...


def check_unicode(text: str, what: str) -> None:
    """Text a tokenizer can take: valid Unicode (a lone surrogate, from a bad \\u escape or a command-line argument
    that was not UTF-8, is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{what} is not valid Unicode ({e.reason} at character {e.start})") from None


def require_text(value: object, what: str) -> str:
    """The stripped text of `value`; bad input fails here with a clear message instead of deep inside a task."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a string, got {type(value).__name__}")
    check_unicode(value, what)
    text = value.strip()
    if not text:
        raise InvalidRequestError(f"{what} is empty")
    return text


def majority_key(task: Task, answers: list[str | None]) -> list[tuple[str, int]]:
    """Group answers by `task.equivalent` and count them, most votes first (ties: first seen first).

    The first answer of a group represents it; None (no answer) never votes. Equivalence need not be
    transitive, so an answer joins the first group whose representative it matches.
    """
    reps: list[str] = []
    counts: list[int] = []
    exact: dict[str, int] = {}  # answer string -> group, so repeated strings skip the (possibly slow) comparison
    for answer in answers:
        if answer is None:
            continue
        group = exact.get(answer)
        if group is None:
            group = next((i for i, rep in enumerate(reps) if task.equivalent(rep, answer)), None)
            if group is None:
                group = len(reps)
                reps.append(answer)
                counts.append(0)
            exact[answer] = group
        counts[group] += 1
    order = sorted(range(len(reps)), key=lambda i: (-counts[i], i))
    return [(reps[i], counts[i]) for i in order]


async def grouped_votes(task: Task, answers: list[str | None]) -> list[tuple[str, int]]:
    """`majority_key` in a worker thread: a math comparison can wait seconds on math-verify, and a server's event
    loop serves every other request meanwhile."""
    return await asyncio.to_thread(majority_key, task, answers)
