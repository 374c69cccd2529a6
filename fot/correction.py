"""Forest-of-Thought's dynamic self-correction of math answers (`MathCorrector`), and what it counts.

Game of 24's kind, every step recomputed exactly and repaired or dropped, lives in fot.trees.tot; the rule checks
themselves (a made-up code output, a wrong `a op b = c`) in fot.tasks.checks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from decimal import Decimal

from pydantic import BaseModel

from fot.decoding.base import Completion, Request, Usage
from fot.tasks.base import Task
from fot.tasks.checks import Check, Failure, Finding, last_number, number
from fot.trees.base import Generate
from fot.trees.mctsr import REFINE


def plain(value: float) -> str:
    """A printed float as an answer writes it: 15 significant digits, all a float holds without its binary noise
    (78.94999999999999 -> 78.95, 123456789012.5 kept), never in exponent form (1.25e+10 -> 12500000000), which the
    answer's parsing would not read as one number."""
    return format(Decimal(f"{value:.15g}"), "f")


class CorrectionUsage(Usage):
    """Usage with self-correction's counters."""

    corrections: int = 0  # answers regenerated or steps repaired by self-correction
    code_checks: int = 0  # code blocks in answers run and compared with the output the answer claimed
    code_skipped: int = 0  # code blocks with a claimed output not judged (not runnable, or printing nothing)
    code_failures: int = 0  # answers whose code does not print what they claimed
    code_repairs: int = 0  # of those, answers repaired with the real output
    arithmetic_checks: int = 0  # `a op b = c` statements in answers recomputed
    arithmetic_failures: int = 0  # answers with a wrong statement (the first wrong claim of an answer was one)
    arithmetic_repairs: int = 0  # of those, answers continued from the corrected statement


class Repair(BaseModel):
    """One wrong claim a rule check found and self-correction repaired: what the answer said and the right value."""

    kind: str  # the check: "code" (a made-up output) or "arithmetic" (a wrong `a op b = c`)
    source: str  # the code, or the statement's left side
    claimed: str
    actual: str


Kept = tuple[str | None, str | None]  # (the answer text kept, the text it replaced or None)


class MathCorrector:
    """Dynamic self-correction of math answers, in one batch per call.

    Rule-based first: the task's rule checks (fot.tasks.checks) find an answer's first wrong claim, a made-up code
    output or a wrong `a op b = c`, and the right value is written in its place. Where the answer only restated a
    made-up output, the real one becomes the answer; otherwise the model continues from the corrected prefix.
    Then the paper's kind: answers that are unsure (mean log-prob below the threshold) or fail the task's check are
    regenerated with a refine prompt, and the better of the two is kept: one that passes the check, then the higher
    mean log-prob."""

    def __init__(
        self,
        task: Task,
        threshold: float,
        usage: CorrectionUsage,
        seed: int,
        max_tokens: int = 384,
        checks: Mapping[str, Check] | None = None,
        refine: bool = True,
    ):
        self.task, self.threshold, self.usage, self.base, self.seed = task, threshold, usage, seed, seed
        self.max_tokens, self.refine = max_tokens, refine
        self.checks = dict(task.checks if checks is None else checks)
        self.repairs: list[Repair] = []

    def needs(self, problem: str, c: Completion) -> bool:
        if not c.ok or not self.refine:
            return False
        lp = c.mean_logprob
        return (lp is not None and lp < self.threshold) or bool(self.task.check(problem, c.text))

    def seed_for(self, request: Request, i: int, kind: int) -> int:
        """The seed of a correction of answer i to `request`: a function of that request's own seed, so the same
        whatever order the trees' answers arrive in (without the lock-step barrier, the order they finish in)."""
        own = request.params.seed
        if own is None:  # a request without a seed: counted, in the order of the calls
            self.seed += 1
            return self.seed
        return (self.base * 1_000_003 + own * 257 + i * 4 + kind) % 2**63

    def findings(self, problem: str, c: Completion) -> list[tuple[str, Finding]]:
        """What each check finds in the answer. It counts nothing, so that it can run in a worker thread."""
        return [(name, check(problem, c.text)) for name, check in self.checks.items()] if c.ok else []

    def failure(self, findings: list[tuple[str, Finding]]) -> Failure | None:
        """The earliest wrong claim of an answer's findings (each check counted in the usage)."""
        first = None
        for name, found in findings:
            self.count(name, "checks", found.checked)
            self.count(name, "skipped", found.skipped)
            if found.failure is not None and (first is None or found.failure.at < first.at):
                first = found.failure
        if first is not None:
            self.count(first.kind, "failures", 1)
        return first

    def count(self, kind: str, what: str, n: int) -> None:
        field = f"{kind}_{what}"
        if field in CorrectionUsage.model_fields:
            setattr(self.usage, field, getattr(self.usage, field) + n)

    def repaired(self, f: Failure) -> None:
        self.repairs.append(Repair(kind=f.kind, source=f.source.strip(), claimed=f.claimed, actual=f.actual))
        self.count(f.kind, "repairs", 1)
        self.usage.corrections += 1

    async def __call__(
        self, gen: Generate, problem: str, requests: list[Request], done: list[Completion]
    ) -> list[Kept]:
        """(the text to keep, the text it replaced or None) for each answer."""
        texts = [c.text if c.ok else None for c in done]
        before: list[str | None] = [None] * len(done)
        # a code check runs model code for up to its step budget: in a worker thread, the event loop (every other
        # request of `fot serve`) goes on meanwhile
        found = await asyncio.to_thread(lambda: [self.findings(problem, c) for c in done])
        failures = {i: f for i, fs in enumerate(found) if (f := self.failure(fs)) is not None}
        for i, f in list(failures.items()):
            restated = await asyncio.to_thread(self.restated, f) if f.kind == "code" else None  # may ask math-verify
            if restated is not None:  # no continuation needed: the executed result is the answer
                before[i], texts[i] = texts[i], restated
                self.repaired(f)
                del failures[i]
        redo = [i for i, c in enumerate(done) if i not in failures and before[i] is None and self.needs(problem, c)]
        critique = "The answer may be wrong or unclear. Check every step and the final answer."
        reqs = [self.continuation(requests[i], failures[i], self.seed_for(requests[i], i, 1)) for i in failures]
        for i in redo:
            content = REFINE.format(problem=problem, answer=done[i].text, critique=critique)
            reqs.append(
                Request.make(
                    [{"role": "user", "content": content}],
                    max_tokens=self.max_tokens,
                    logprobs=True,
                    seed=self.seed_for(requests[i], i, 2),
                )
            )
        answers = await gen(reqs)  # with no requests, it still takes part in this phase, so the batch goes on
        for i, again in zip(failures, answers[: len(failures)], strict=True):
            if again.ok:
                before[i], texts[i] = texts[i], failures[i].prefix + again.text
                self.repaired(failures[i])
        for i, again in zip(redo, answers[len(failures) :], strict=True):
            self.usage.corrections += 1
            if again.ok and self.better(problem, again, done[i]):
                before[i], texts[i] = texts[i], again.text
        return list(zip(texts, before, strict=True))

    def restated(self, f: Failure) -> str | None:
        """The repaired answer when all the answer did after the made-up output was to restate it, else None."""
        claimed, actual = last_number(f.claimed), last_number(f.actual)
        said = self.task.extract(f.rest)
        if claimed is None or actual is None or said is None or not self.task.equivalent(said, claimed):
            return None
        value = number(actual)
        shown = actual if value is None or not set(".eE") & set(actual) else plain(value)
        return f"{f.prefix}The answer is {shown}."

    @property
    def continuation_tokens(self) -> int:
        """What a repair's continuation may generate: half an answer's budget, at least 32 tokens."""
        return max(self.max_tokens // 2, 32)

    def continuation(self, request: Request, f: Failure, seed: int) -> Request:
        """Go on from the corrected prefix: the same question, the answer so far as the assistant's message."""
        messages = request.prompt if isinstance(request.prompt, list) else [{"role": "user", "content": request.prompt}]
        return Request.make(
            [*messages, {"role": "assistant", "content": f.prefix}],
            max_tokens=self.continuation_tokens,
            logprobs=True,
            seed=seed,
        )

    def better(self, problem: str, new: Completion, old: Completion) -> bool:
        def rank(c: Completion) -> tuple[bool, float]:
            return (not self.task.check(problem, c.text), c.mean_logprob if c.mean_logprob is not None else -1e9)

        return rank(new) > rank(old)
