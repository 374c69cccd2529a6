"""Forest-of-Thought (Bi et al., 2412.09078): several reasoning trees per problem, combined by consensus.

    solution = fot.solve("Tom has 3 boxes of 12 apples and eats 5. How many are left?")
    solution = fot.solve("4 6 1 10")                      # Game of 24, detected
    solutions = fot.solve_many([...], trees=8)             # problems in parallel, one backend

The four parts, as the paper names them:
  input augmentation   tree i > 0 sees a different input: the i-th most similar worked example (TF-IDF over an
                       example pool) for math, a shuffled order of the numbers for Game of 24 (fot.augment);
  sparse activation    after each step only the top-k trees (and those above `min_score`) keep expanding; the
                       others stop for good, and the tokens they would have spent are counted as saved;
  self-correction      math (fot.correction): the rule checks repair an answer's first wrong claim, and an answer
                       whose mean token log-prob is below the threshold, or that fails the task's check, is
                       regenerated with a refine prompt and the better one kept; Game of 24: every step is
                       recomputed exactly and repaired or dropped (in fot.trees.tot);
  CGED                 majority / plurality / expert / chain-of-thought fallback (fot.consensus); the search stops
                       early once one answer holds more than half of the trees.
Steps are in step: every tree ends a step before sparse activation picks who takes the next. Within a step each
tree's call goes to the backend at once, where continuous batching merges what arrives together; with
`lockstep=True` each phase of a step waits for every tree and reaches the backend as ONE batch
(fot.trees.base.Batcher).
The search never sees a gold answer: nothing here can stop on a correct one.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fot.augment import program_of_thought, shipped_examples, shuffle_numbers
from fot.consensus import decide, majority
from fot.correction import CorrectionUsage, MathCorrector, Repair
from fot.decoding.base import Backend, Completion, Request
from fot.errors import ContextOverflowError, InvalidRequestError, SearchError
from fot.tasks import detect_task, get_task
from fot.tasks.base import Task, check_unicode, grouped_votes, majority_key
from fot.tasks.checks import Check, Failure
from fot.trees.base import Batcher, Tree, run_step
from fot.trees.cot import chain_of_thought, self_consistency
from fot.trees.mctsr import REFINE, MCTSr, MCTSrConfig
from fot.trees.tot import ToT, ToTConfig
from fot.viewer import page, tree_graph

Method = Literal["fot", "mctsr", "tot", "cot", "sc"]
MAX_TREES = 64  # trees (or sc samples) per problem: each is a request per step, batched together
MAX_SEED = 2**53  # a search's seed is below it: its requests are seeded from seed * 1000 on, below 2**63
# Per task: bumped by a change that makes a search of that task do something else with the same inputs and seed
# (its prompts, its sampling, its checks, its decision); a change to what all tasks share bumps them all. Eval runs
# are named by it, so one run never mixes two versions.
SEARCH_VERSIONS: Mapping[str, int] = MappingProxyType({"math": 1, "game24": 2})


class SparseConfig(BaseModel):
    """Sparse activation: `top_k` trees keep expanding after each step (None: half of them, rounded up);
    trees scoring below `min_score` stop too (MCTSr: Q in 0..100; ToT: the best state's value, a sum over its
    `value_samples` verdicts of 20 / 1 / 0.001)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    top_k: int | None = Field(None, ge=1)
    min_score: float | None = None


class CorrectionConfig(BaseModel):
    """Dynamic self-correction: math answers with a mean token log-prob below `logprob_threshold` (the paper's -1)
    or failing the task's check are regenerated; Game-of-24 steps are recomputed and repaired. The task's rule
    checks (`code`, `arithmetic`) repair the first wrong claim of an answer in FoT and MCTSr, and in cot and sc
    only with `baselines`, so that an ablation compares like with like."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    logprob_threshold: float = -1.0
    code: bool = True  # run the answers' Python (safely) and repair outputs they made up
    arithmetic: bool = True  # recompute the prose's `a op b = c` statements and repair the first wrong one
    baselines: bool = False  # the rule checks for cot and sc too (off: the plain baselines)

    def checks(self, task: Task) -> dict[str, Check]:
        """The task's rule checks that this config leaves on (checks of other names are on with `enabled`)."""
        switch = {"code": self.code, "arithmetic": self.arithmetic}
        return {n: f for n, f in task.checks.items() if self.enabled and switch.get(n, True)}


class ForestConfig(BaseModel):
    """Everything a search takes, with the paper's defaults. `trees` is also the sample count of "sc"."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    trees: int = Field(4, ge=1, le=MAX_TREES)
    method: Method = "fot"
    mctsr: MCTSrConfig = MCTSrConfig()
    tot: ToTConfig = ToTConfig()
    sparse: SparseConfig = SparseConfig()
    correction: CorrectionConfig = CorrectionConfig()
    # math, fot only: the last trees answer with a program, at most trees - 1 of them (tree 0 reasons in prose)
    program_trees: int = Field(0, ge=0, le=MAX_TREES)
    # fot: the chains of thought CGED asks for when the trees tie and the expert does not know. 1: one greedy
    # chain decides (the paper's fallback); N > 1: N sampled chains vote together with the trees
    fallback_samples: int = Field(1, ge=1, le=MAX_TREES)
    early_stop: bool = True
    # True: each phase of a step waits for every tree and goes to the backend as one batch; False: each tree's call
    # goes at once, and the backend's continuous batching merges them (a short answer does not wait for the longest)
    lockstep: bool = False
    sc_temperature: float = Field(0.7, ge=0)
    seed: int = Field(0, ge=0, lt=MAX_SEED)

    @model_validator(mode="after")
    def _program_trees_fit(self) -> ForestConfig:
        """Refused, not capped or ignored: tree 0 reasons in prose, and only FoT's trees take a program prompt."""
        if self.program_trees and self.method != "fot":
            raise ValueError(f"program_trees is for method 'fot', not {self.method!r}")
        if self.program_trees >= self.trees:
            raise ValueError(f"program_trees ({self.program_trees}) must be below trees ({self.trees}): tree 0 reasons")
        if self.fallback_samples > 1 and self.method != "fot":
            raise ValueError(f"fallback_samples is for method 'fot' (its CGED), not {self.method!r}")
        return self


class SolveUsage(CorrectionUsage):
    """What one solve cost. Token counts are this solve's own; forward passes and draft counters are the
    backend's during the solve (shared with any solve running at the same time)."""

    backend_calls: int = 0
    tree_steps_skipped: int = 0  # by sparse activation
    tokens_saved: int = 0  # estimated: skipped tree-steps x the mean tokens of a tree-step so far
    seconds: float = 0.0


class Progress(BaseModel):
    """Where a search stands, reported after its first answers (step 0) and after each step: what a progress bar
    or a streaming client shows."""

    step: int
    trees: int
    trees_alive: int  # still expanding: neither done nor pruned by sparse activation
    votes: dict[str, int]  # the trees' answers so far, equivalent answers counted together
    generated_tokens: int
    seconds: float


ProgressHook = Callable[[Progress], None]


class Solution(BaseModel):
    problem: str
    task: str
    method: Method
    answer: str | None
    votes: dict[str, int]
    confidence: float
    decision: str  # majority | plurality | expert | fallback | single
    tree_answers: list[str | None]
    trees: list[dict]  # networkx node-link data; `graph(i)` gives the DiGraph back
    usage: SolveUsage
    repairs: list[Repair] = []  # what the rule checks repaired, in the order they did

    def graph(self, i: int = 0) -> nx.DiGraph:
        """Tree `i` of the search as a networkx DiGraph; an InvalidRequestError where there is no such tree."""
        if not self.trees:
            raise InvalidRequestError(
                f"method {self.method!r} searches no trees, so it has no graph; its samples are tree_answers"
            )
        if not 0 <= i < len(self.trees):
            raise InvalidRequestError(f"tree {i} does not exist: this solution has trees 0..{len(self.trees) - 1}")
        return tree_graph(self.trees[i])

    def to_html(self) -> str:
        """One self-contained HTML page (no network needed) that draws every tree, the votes and the usage."""
        return page([self.model_dump()])


# ---- the search ---------------------------------------------------------------------------------------------------
class Forest:
    """One problem's search over a backend. `run()` returns the Solution."""

    def __init__(
        self, problem: str, task: Task, config: ForestConfig, backend: Backend, progress: ProgressHook | None = None
    ):
        self.problem, self.task, self.config, self.backend = problem, task, config, backend
        self.progress = progress
        self.usage = SolveUsage()
        self.errors: list[str] = []  # the first few failed requests' causes
        self.refused_only = True  # every failed request (if any) was refused by the backend itself
        self.rng = random.Random(config.seed)
        self.batchers: list[Batcher] = []
        self.corrector: MathCorrector | None = None
        self.t0 = time.perf_counter()

    def batcher(self, participants: int) -> Batcher:
        b = Batcher(self.backend, participants, meter=self.meter, lockstep=self.config.lockstep)
        self.batchers.append(b)
        return b

    def meter(self, requests: list[Request], done: list[Completion]) -> None:
        u = self.usage
        u.backend_calls += 1
        u.requests += len(requests)
        u.failed += sum(not c.ok for c in done)
        self.refused_only &= all(c.ok or c.refused for c in done)
        self.errors += [c.error for c in done if not c.ok][: 3 - len(self.errors)]
        u.prompt_tokens += sum(c.prompt_tokens for c in done)
        u.generated_tokens += sum(c.generated_tokens for c in done)

    async def single(self, requests: list[Request]) -> list[Completion]:
        return await self.batcher(1).generate(requests)

    def build_trees(self) -> list[Tree]:
        """One tree per (augmented) input, of the kind the task names (`Task.tree`)."""
        c = self.config
        seeds = [c.seed * 1000 + 100 * i for i in range(c.trees if c.method == "fot" else 1)]
        return {"tot": self.tot_trees, "mctsr": self.mctsr_trees}[self.task.tree](seeds)

    def tot_trees(self, seeds: list[int]) -> list[Tree]:
        c, fot = self.config, self.config.method == "fot"
        inputs = shuffle_numbers(self.problem, len(seeds), self.rng) if fot else [(self.problem, "")]
        correct = fot and c.correction.enabled
        return [
            ToT(self.task, p, c.tot, seed=s, correct=correct, name=f"tree{i}")
            for i, ((p, _), s) in enumerate(zip(inputs, seeds, strict=True))
        ]

    def mctsr_trees(self, seeds: list[int]) -> list[Tree]:
        c, fot = self.config, self.config.method == "fot"
        inputs = shipped_examples()(self.problem, len(seeds), self.rng) if fot else [(self.problem, "")]
        if fot and c.program_trees:
            inputs = program_of_thought(inputs, c.program_trees)
        checks = c.correction.checks(self.task)
        if c.correction.enabled and (fot or checks):  # MCTSr alone takes the rule checks, FoT also the paper's kind
            threshold, seed = c.correction.logprob_threshold, c.seed * 1000 + 999
            self.corrector = MathCorrector(
                self.task, threshold, self.usage, seed, c.mctsr.max_tokens, checks, refine=fot
            )
        return [
            MCTSr(self.task, p, c.mctsr, example=ex, seed=s, corrector=self.corrector, name=f"tree{i}")
            for i, ((p, ex), s) in enumerate(zip(inputs, seeds, strict=True))
        ]

    def activate(self, trees: list, live: list) -> list:
        """Sparse activation: which of the live trees expand in the next step."""
        sp = self.config.sparse
        if self.config.method != "fot" or not sp.enabled:
            return live
        k = sp.top_k or math.ceil(len(trees) / 2)
        ranked = sorted(live, key=lambda t: (-t.score(), trees.index(t)))
        return [t for t in ranked[:k] if sp.min_score is None or t.score() >= sp.min_score]

    async def run(self) -> Solution:
        self.t0, before = time.perf_counter(), self.backend.usage.model_copy()
        c = self.config
        try:
            solution = await (self.baseline() if c.method in ("cot", "sc") else self.search())
        except BaseException:  # cancelled, or failed: the batches in flight are cancelled, not left running
            await asyncio.gather(*(b.cancel() for b in self.batchers))
            raise
        after = self.backend.usage
        self.usage.forward_passes = after.forward_passes - before.forward_passes
        self.usage.draft_tokens = after.draft_tokens - before.draft_tokens
        self.usage.accepted_tokens = after.accepted_tokens - before.accepted_tokens
        self.usage.seconds = time.perf_counter() - self.t0
        if self.usage.failed:  # an answer decided without them is not this search's result
            raise SearchError(
                f"{self.usage.failed} of {self.usage.requests} backend requests failed, so the search has no "
                f"result: {'; '.join(self.errors)}",
                solution,
                retryable=not self.refused_only,
            )
        return solution

    async def baseline(self) -> Solution:
        c = self.config
        checks = c.correction.checks(self.task)
        if c.correction.baselines and checks:  # only the rule checks
            seed = c.seed * 1000 + 999
            self.corrector = MathCorrector(
                self.task, -math.inf, self.usage, seed, c.mctsr.max_tokens, checks, refine=False
            )
        if c.method == "cot":
            answer, _ = await chain_of_thought(
                self.single,
                self.task,
                self.problem,
                seed=c.seed,
                max_tokens=c.mctsr.max_tokens,
                corrector=self.corrector,
            )
            answers = [answer]
            votes = dict(majority_key(self.task, answers))
        else:
            answer, answers, votes = await self_consistency(
                self.single,
                self.task,
                self.problem,
                c.trees,
                temperature=c.sc_temperature,
                seed=c.seed,
                max_tokens=c.mctsr.max_tokens,
                corrector=self.corrector,
            )
        return self.solution(answer, votes, votes.get(answer, 0) / max(len(answers), 1), "single", answers, [])

    async def check_budget(self, trees: list) -> None:
        """The longest request a math tree makes must fit the backend's context: a refine of an answer and a
        critique of `max_tokens` each; with rule checks, the answer may be a repaired one (its prefix and its
        continuation), and the refine's own answer may be repaired and continued in turn. Checked before any
        generation, not found out after minutes of search."""
        c, checked = self.config.mctsr, self.corrector is not None and bool(self.corrector.checks)
        trees = [t for t in trees if isinstance(t, MCTSr)]
        if not trees or c.rollouts == 0:
            return
        word = " x"  # about one token a word in the tokenizers we serve
        answer = c.max_tokens + (self.corrector.continuation_tokens if checked else 0)
        for t in trees:
            seed = t.seed
            worst = [t.request(REFINE, answer=word * answer, critique=word * c.max_tokens, logprobs=True)]
            t.seed = seed  # the check takes no seed from the tree's own requests
            if checked:
                cut = Failure(kind="code", source="", claimed="", actual="", at=0, prefix=word * c.max_tokens, rest="")
                worst.append(self.corrector.continuation(worst[0], cut, seed))
            try:
                for request in worst:
                    await self.backend.admit(request)
            except ContextOverflowError as e:
                longest = "a refine of a repaired answer, or its own repair's continuation" if checked else "a refine"
                raise ContextOverflowError(
                    f"this search's longest request ({longest}, with {c.max_tokens}-token texts) would not fit: {e}; "
                    "lower max_tokens or shorten the problem"
                ) from None

    async def search(self) -> Solution:
        c, trees = self.config, self.build_trees()
        if hasattr(self.backend, "admit"):
            await self.check_budget(trees)
        batch = self.batcher(len(trees))
        await run_step(batch, [t.start(batch.generate) for t in trees])
        active = list(trees)
        step_tokens: list[int] = []
        while True:
            live = [t for t in active if not t.done]
            stopping = c.early_stop and len(trees) > 1
            wanted = stopping or self.progress is not None
            ranked = await grouped_votes(self.task, [t.answer() for t in trees]) if wanted else []
            self.report(len(step_tokens), trees, live, dict(ranked))
            if not live or (stopping and majority(ranked, len(trees)) is not None):
                break
            chosen = self.activate(trees, live)
            skipped = [t for t in live if t not in chosen]
            active = [t for t in active if t not in skipped]  # pruned trees stop for good
            for t in skipped:
                t.tree.graph.graph["pruned_at_step"] = len(step_tokens) + 1
            before = self.usage.generated_tokens
            batch = self.batcher(len(chosen))
            await run_step(batch, [t.step(batch.generate) for t in chosen])
            if chosen:  # a step that expanded nothing (every tree below `min_score`) is no tree-step to average
                step_tokens.append((self.usage.generated_tokens - before) / len(chosen))
            self.usage.tree_steps_skipped += sum(t.remaining_steps() for t in skipped)
        mean = sum(step_tokens) / len(step_tokens) if step_tokens else 0.0
        self.usage.tokens_saved = round(self.usage.tree_steps_skipped * mean)
        self.usage.corrections += sum(t.corrections for t in trees)
        answers = [t.answer() for t in trees]
        for t in trees:  # what the viewer highlights: the path to each tree's answer
            t.tree.graph.graph["answer_node"] = t.answer_node()
        graphs = [t.tree.to_dict() for t in trees]
        if len(trees) == 1:
            answer = answers[0]  # one tree: its answer, backed by all of the forest, or by none when it has none
            votes, confidence = ({answer: 1}, 1.0) if answer is not None else ({}, 0.0)
            return self.solution(answer, votes, confidence, "single", answers, graphs)
        d = await decide(
            self.task, self.problem, answers, self.single, seed=c.seed, max_tokens=c.mctsr.max_tokens,
            corrector=self.corrector, samples=c.fallback_samples, temperature=c.sc_temperature,
        )  # fmt: skip
        return self.solution(d.answer, d.votes, d.confidence, d.method, answers, graphs)

    def report(self, step: int, trees: list, live: list, votes: dict[str, int]) -> None:
        if self.progress is None:
            return
        self.progress(
            Progress(
                step=step,
                trees=len(trees),
                trees_alive=len(live),
                votes=votes,
                generated_tokens=self.usage.generated_tokens,
                seconds=time.perf_counter() - self.t0,
            )
        )

    def solution(self, answer, votes, confidence, decision, answers, graphs) -> Solution:
        return Solution(
            problem=self.problem,
            task=self.task.name,
            method=self.config.method,
            answer=answer,
            votes=votes,
            confidence=confidence,
            decision=decision,
            tree_answers=answers,
            trees=graphs,
            usage=self.usage,
            repairs=self.corrector.repairs if self.corrector is not None else [],
        )


# ---- the public face --------------------------------------------------------------------------------------------
_DEFAULT_BACKEND: Backend | None = None


def default_backend() -> Backend:
    """The native engine on the embedded model with EMS-SD prompt lookup, made once per process."""
    global _DEFAULT_BACKEND
    if _DEFAULT_BACKEND is None:
        from fot.decoding.native import NativeBackend

        _DEFAULT_BACKEND = NativeBackend()
    return _DEFAULT_BACKEND


def make_config(config: ForestConfig | dict | None, **overrides) -> ForestConfig:
    if config is not None and not isinstance(config, ForestConfig | dict):
        raise InvalidRequestError(f"config must be a ForestConfig or a dict, got {type(config).__name__}")
    try:
        base = config.model_dump() if isinstance(config, ForestConfig) else dict(config or {})
        return ForestConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as e:
        raise InvalidRequestError(f"invalid search config: {e}") from None


async def asolve(
    problem: str,
    *,
    task: str = "auto",
    trees: int | None = None,
    method: Method | None = None,
    backend: Backend | None = None,
    config: ForestConfig | dict | None = None,
    seed: int | None = None,
    progress: ProgressHook | None = None,
) -> Solution:
    """`solve` for async code (notebooks, servers). `progress` is called with a `Progress` after each search step.
    Cancelling the task cancels the search's requests in the backend too."""
    options = {"task": task, "trees": trees, "method": method, "backend": backend, "config": config, "seed": seed}
    the_task, text, cfg = check_problem(problem, options)
    return await Forest(text, the_task, cfg, backend or default_backend(), progress).run()


def check_problem(problem: str, options: dict) -> tuple[Task, str, ForestConfig]:
    """`asolve`'s checks of a problem and its keyword `options`, which need no model: the task, the normalised
    problem and the search's config, or InvalidRequestError."""
    backend = options.get("backend")
    if backend is not None and not isinstance(backend, Backend):
        raise InvalidRequestError(
            f"backend must be a Backend, got {type(backend).__name__}: build one with "
            "fot.decoding.make_backend('native' | 'vllm' | 'openai', ...)"
        )
    overrides = {k: options.get(k) for k in ("trees", "method", "seed")}
    cfg = make_config(options.get("config"), **overrides)
    the_task, text = validate(problem, options.get("task", "auto"), cfg)
    return the_task, text, cfg


def validate(problem: str, task: str, config: ForestConfig) -> tuple[Task, str]:
    """The task and the normalised problem, or InvalidRequestError if it or the `config` does not fit it: checked
    before any model work."""
    if not isinstance(problem, str) or not problem.strip():
        raise InvalidRequestError(f"a problem must be a non-empty string, got {problem!r:.60}")
    check_unicode(problem, "the problem")
    the_task = get_task(detect_task(problem) if task == "auto" else task)
    check_method(the_task.name, config.method)
    if config.program_trees and the_task.tree != "mctsr":
        raise InvalidRequestError(f"program_trees is for math problems, not {the_task.name}")
    return the_task, the_task.parse(problem)


def check_method(task: str, method: str) -> None:
    """The tree methods fit the tasks whose tree they are (ToT: Game of 24, MCTSr: math); the others fit all."""
    if method in ("tot", "mctsr") and get_task(task).tree != method:
        raise InvalidRequestError(f"method {method!r} does not fit the {task} task")


def solve(problem: str, **kwargs) -> Solution:
    """Solve one problem with Forest-of-Thought (see `asolve` for the keywords; `trees=4, method="fot"`)."""
    from fot.decoding.base import run_sync

    return run_sync(asolve(problem, **kwargs))


async def asolve_many(problems: Iterable[str], *, return_exceptions: bool = False, **kwargs) -> list[Solution]:
    """Solve problems concurrently on one backend: their steps' batches meet in the backend's batching window.
    Every problem is checked before any work; with `return_exceptions`, a problem that is refused or fails gives
    its exception in its place instead of ending them all."""
    if isinstance(problems, str | bytes) or not isinstance(problems, Iterable):
        raise InvalidRequestError(
            f"solve_many takes a list of problems, got {type(problems).__name__}: for one problem use solve"
        )
    problems = list(problems)  # a generator, a pandas Series, dict keys: any iterable of problems
    if not return_exceptions:
        for p in problems:
            check_problem(p, kwargs)
    tasks = [asyncio.ensure_future(asolve(p, **kwargs)) for p in problems]
    try:
        return list(await asyncio.gather(*tasks, return_exceptions=return_exceptions))
    except BaseException:  # one failed (or we were cancelled): the others' searches stop too, not run on unseen
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def solve_many(problems: Iterable[str], **kwargs) -> list[Solution]:
    from fot.decoding.base import run_sync

    return run_sync(asolve_many(problems, **kwargs))


__all__ = ["ForestConfig", "Progress", "Solution", "SolveUsage", "asolve", "asolve_many", "solve", "solve_many"]
