"""Baselines: chain of thought (one greedy answer) and self-consistency (majority of n sampled answers), with
the program-aided checks as an option (`corrector`), so that an ablation can compare both ways.

Also FoT's fallback when the forest's decision is "I don't know". For Game of 24 the answer line is
"Answer: <expression> = 24"; for math, "The answer is X." The Game-of-24 example (rank 455) lies outside the
evaluation split (ranks 901-1000), unlike the ToT paper's prompt, which shows rank 1000's solution.
"""

from __future__ import annotations

from fot.decoding.base import Completion, Request
from fot.tasks.base import Task, grouped_votes
from fot.trees.base import Generate
from fot.trees.mctsr import ANSWER, Corrector

GAME24 = """Use each of the four numbers exactly once with + - * / and parentheses to make 24.
Input: 2 9 10 12
Steps:
12 * 2 = 24 (left: 9 10 24)
10 - 9 = 1 (left: 1 24)
24 * 1 = 24 (left: 24)
Answer: (12 * 2) * (10 - 9) = 24
Input: {problem}
Steps:
"""
NEXT_PUZZLE = "\nInput:"  # where a few-shot answer ends, and the model's own next example begins


def cot_request(
    task: Task, problem: str, *, n: int = 1, temperature: float = 0.0, seed: int = 0, max_tokens: int = 384
) -> Request:
    params = {"n": n, "temperature": temperature, "seed": seed, "max_tokens": max_tokens, "logprobs": True}
    if task.name == "game24":  # the model goes on to a puzzle of its own, whose "Answer:" would be read
        return Request.make(GAME24.format(problem=problem), stop=(NEXT_PUZZLE,), **params)
    return Request.make([{"role": "user", "content": ANSWER.format(problem=problem, example="")}], **params)


async def corrected(gen: Generate, problem: str, request: Request, done: Completion, corrector: Corrector | None):
    """The texts of a request's samples, after the corrector's checks and repairs where there is one."""
    if not done.ok:
        return []
    if corrector is None:
        return done.texts
    samples = [Completion(prompt_tokens=done.prompt_tokens, outputs=[o]) for o in done.outputs]
    return [text for text, _ in await corrector(gen, problem, [request] * len(samples), samples)]


async def chain_of_thought(
    gen: Generate, task: Task, problem: str, *, seed: int = 0, max_tokens: int = 384, corrector: Corrector | None = None
) -> tuple[str | None, Completion]:
    request = cot_request(task, problem, seed=seed, max_tokens=max_tokens)
    [done] = await gen([request])
    texts = await corrected(gen, problem, request, done, corrector)
    return (task.extract(texts[0]) if texts and texts[0] is not None else None), done


async def self_consistency(
    gen: Generate,
    task: Task,
    problem: str,
    samples: int,
    *,
    temperature: float = 0.7,
    seed: int = 0,
    max_tokens: int = 384,
    corrector: Corrector | None = None,
) -> tuple[str | None, list[str | None], dict[str, int]]:
    """The most common of `samples` sampled answers (None if none of them has an answer), the answers, and the
    votes: equivalent answers counted together under the first of them, most votes first."""
    request = cot_request(task, problem, n=samples, temperature=temperature, seed=seed, max_tokens=max_tokens)
    [done] = await gen([request])
    answers = [
        task.extract(t) if t is not None else None for t in await corrected(gen, problem, request, done, corrector)
    ]
    votes = dict(await grouped_votes(task, answers))
    return next(iter(votes), None), answers, votes
