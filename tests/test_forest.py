"""The search's rules, pinned with the scripted backend (canned answers; the real models are in test_solve.py)."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest
from loop import ticks_during

from fot.augment import ExampleRetriever, shuffle_numbers
from fot.consensus import decide
from fot.correction import MathCorrector
from fot.decoding.base import BackendError, Output, Request
from fot.decoding.scripted import ScriptedBackend
from fot.errors import InvalidRequestError, SearchError
from fot.forest import Forest, ForestConfig, SolveUsage, asolve, asolve_many
from fot.tasks import Game24Task, MathTask
from fot.trees.base import Batcher, Tree, run_step
from fot.trees.mctsr import MCTSr, MCTSrConfig, parse_reward
from fot.trees.tot import ToT, parse_value

MATH = MathTask()
GAME = Game24Task()


def content(r: Request) -> str:
    return r.prompt if isinstance(r.prompt, str) else r.prompt[-1]["content"]


def math_script(answer: str = "42", score: str = "Score: 80"):
    def respond(r: Request, j: int) -> str:
        text = content(r)
        if "Grade the answer" in text:
            return score
        if "Critique this answer" in text:
            return "Check the sum again."
        if "Which candidate" in text:
            return "1"
        return f"Adding up gives {answer}. The answer is {answer}."

    return respond


def solve(problem, backend, **kw):
    return asyncio.run(asolve(problem, backend=backend, **kw))


# ---- MCTSr ---------------------------------------------------------------------------------------------------------
def tree_with(qs_visits: list[tuple[int | None, float, int]]) -> MCTSr:
    """An MCTSr tree built by hand: (parent, q, visits) per answer node, parent None = the problem node."""
    t = MCTSr(MATH, "p", MCTSrConfig())
    for parent, q, visits in qs_visits:
        node = t.add_answer(t.root if parent is None else parent, "The answer is 1.")
        t.tree[node].update(q=q, visits=visits)
    t.tree[t.root]["visits"] = sum(v for p, _, v in qs_visits if p is None)
    return t


def test_uct_selection_follows_the_formula():
    t = tree_with([(None, 50.0, 9), (None, 48.8, 1)])
    uct = {n: t.tree[n]["q"] + 1.4 * math.sqrt(math.log(10 + 1) / (t.tree[n]["visits"] + 1e-6)) for n in (1, 2)}
    assert t.uct(1) == pytest.approx(uct[1]) and t.uct(2) == pytest.approx(uct[2])
    assert t.select() == max(uct, key=uct.get) == 2  # fewer visits wins here despite the lower Q


def test_expansion_rule():
    t = tree_with([(None, 50.0, 1), (1, 40.0, 1), (1, 45.0, 1)])
    assert t.expandable(1)  # two children, none better
    t.add_answer(1, "The answer is 2.")
    assert not t.expandable(1)  # max_children = 3 reached
    t2 = tree_with([(None, 50.0, 1), (1, 60.0, 1)])
    assert not t2.expandable(1)  # a child beats it
    assert not t2.expandable(t2.root)  # the problem node is never selected


def test_reward_q_and_backpropagation():
    assert parse_reward("Score: 85") == 85 and parse_reward("I give it 120") == 100 and parse_reward("none") is None
    t = tree_with([(None, 30.0, 1)])
    child = t.add_answer(1, "The answer is 3.")
    backend = ScriptedBackend(lambda r, j: ["Score: 80", "Score: 60", "Score: 100"][j])
    asyncio.run(t.reward(Batcher(backend, 1).generate, [child]))
    assert t.tree[child]["rewards"] == [80, 60, 50]  # 100 > 95 loses 50 (full-score suppression)
    q = (50 + (80 + 60 + 50) / 3) / 2
    assert t.tree[child]["q"] == pytest.approx(q)
    assert t.tree[1]["q"] == pytest.approx((30 + q) / 2)  # parent: (Q + best child Q) / 2
    assert t.tree[child]["visits"] == 1 and t.tree[1]["visits"] == 2 and t.tree[t.root]["visits"] == 2


def test_a_failed_node_is_marked_the_search_goes_on_and_the_solve_fails():
    """The tree survives a failed request (the node is marked), but a search that lost requests has no result:
    the solve raises SearchError, with what it reached attached for inspection."""

    def respond(r, j):
        return RuntimeError("node down") if "Critique this answer" in content(r) else math_script()(r, j)

    with pytest.raises(SearchError, match="2 of 5 backend requests failed.*node down") as failure:
        solve("What is 40 + 2?", ScriptedBackend(respond), method="mctsr", config={"mctsr": {"rollouts": 2}})
    sol = failure.value.solution
    g = sol.graph(0)
    assert any(a["failed"] for _, a in g.nodes(data=True))
    assert sol.answer == "42"


@pytest.mark.parametrize("method", ["cot", "sc"])
def test_a_failed_baseline_request_fails_the_solve(method):
    """Chain of thought and self-consistency send one request: when it fails the solve raises SearchError with the
    backend's error, not an arithmetic error from an empty vote."""
    backend = ScriptedBackend(lambda r, j: RuntimeError("node down"))
    with pytest.raises(SearchError, match="1 of 1 backend requests failed.*node down") as failure:
        solve("What is 40 + 2?", backend, method=method, trees=4)
    assert failure.value.solution.answer is None


def test_a_tree_that_raises_stops_the_other_trees():
    """When one tree's call raises (a backend that stopped), the solve fails with that error and the other trees
    stop with it: no requests are sent for a failed solve while the event loop (a server, an eval) goes on."""

    class Stopping(ScriptedBackend):
        raised = False

        async def _generate(self, requests, prepared):
            await asyncio.sleep(0.01)
            if not self.raised and any("Critique this answer" in content(r) for r in requests):
                self.raised = True  # one tree's call only
                raise BackendError("the worker stopped")
            return await super()._generate(requests, prepared)

    backend = Stopping(math_script())
    cfg = {"mctsr": {"rollouts": 8}, "early_stop": False, "sparse": {"enabled": False}}

    async def go() -> tuple[int, int]:
        with pytest.raises(BackendError, match="the worker stopped"):
            await asolve("What is 40 + 2?", backend=backend, trees=4, config=cfg)
        calls = len(backend.batches)
        await asyncio.sleep(0.3)
        return calls, len(backend.batches)

    calls, later = asyncio.run(go())
    assert later == calls


def test_a_backend_that_returns_too_few_completions_fails_the_callers_instead_of_hanging():
    """The Backend contract is one completion per request. A third-party backend that breaks it fails every caller
    of the batch with the cause; before, the caller past the end got an empty list and the meter could raise
    with nobody to hear it."""

    class Short(ScriptedBackend):
        async def _generate(self, requests, prepared):
            return (await super()._generate(requests, prepared))[:-1]

    with pytest.raises(BackendError, match="scripted returned 0 completions for 1 requests"):
        solve("What is 40 + 2?", Short(math_script()), method="cot")


def test_solve_many_checks_every_problem_before_any_work():
    """A bad problem at index 2 was refused only after the default model had loaded and problem 0 had started;
    a string was split into one-character problems."""
    backend = ScriptedBackend(math_script())
    with pytest.raises(InvalidRequestError, match="a problem must be a non-empty string"):
        asyncio.run(asolve_many(["What is 40 + 2?", "What is 1 + 1?", "  "], backend=backend, method="cot"))
    with pytest.raises(InvalidRequestError, match="does not fit"):
        asyncio.run(asolve_many(["What is 40 + 2?", "4 6 1 10"], backend=backend, method="mctsr"))
    with pytest.raises(InvalidRequestError, match="takes a list of problems, got str"):
        asyncio.run(asolve_many("What is 40 + 2?", backend=backend))
    assert backend.batches == []  # nothing was sent
    mixed = asyncio.run(asolve_many(["What is 40 + 2?", ""], backend=backend, method="cot", return_exceptions=True))
    assert mixed[0].answer == "42" and isinstance(mixed[1], InvalidRequestError)
    [again] = asyncio.run(asolve_many((p for p in ["What is 40 + 2?"]), backend=backend, method="cot"))  # any iterable
    assert again.answer == "42"


def test_when_one_of_many_searches_fails_the_others_stop():
    """asolve_many raised the first failure and left the other searches running on the backend, unseen."""
    started, cancelled = asyncio.Event(), []

    class Split(ScriptedBackend):
        async def _generate(self, requests, prepared):
            if "7 * 8" in str(requests[0].prompt):
                await started.wait()
                raise RuntimeError("boom")
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return await super()._generate(requests, prepared)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await asolve_many(["What is 7 * 8?", "What is 40 + 2?"], backend=Split(math_script()), method="cot")
        assert cancelled == [True]  # before asolve_many returned

    asyncio.run(main())


def test_a_batch_leaves_out_the_calls_of_cancelled_callers():
    """A tree cancelled while its call waited at the barrier (its solve failed) has no request in the batch that
    the barrier sends on."""
    backend = ScriptedBackend(math_script())

    async def go() -> Request:
        batcher = Batcher(backend, 2, lockstep=True)
        gone = asyncio.ensure_future(batcher.generate([Request.make("What is 1 + 1?")]))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        [done] = await batcher.generate([Request.make("What is 40 + 2?")])
        return done

    assert asyncio.run(go()).text.endswith("The answer is 42.")
    assert [[content(r) for r in batch] for batch in backend.batches] == [["What is 40 + 2?"]]


# ---- batching, augmentation, determinism --------------------------------------------------------------------------
def test_with_lockstep_each_phase_of_a_step_is_one_backend_batch():
    backend = ScriptedBackend(math_script())
    cfg = {"mctsr": {"rollouts": 1}, "early_stop": False, "sparse": {"enabled": False}, "lockstep": True}
    sol = solve("What is 40 + 2?", backend, trees=4, config=cfg)
    sizes = [len(b) for b in backend.batches]
    # start: 4 first answers, then 4 x 2 rewards (answer + dummy); one rollout: 4 critiques, 4 refines, 4 rewards
    assert sizes[:2] == [4, 8] and sizes[2:5] == [4, 4, 4]
    assert sol.usage.backend_calls == len(backend.batches)


def test_without_lockstep_each_trees_call_goes_to_the_backend_at_once():
    """lockstep=False (the default): no barrier, every tree's call is its own backend call (the backend merges
    them), and the search is the same: same answer, same requests."""
    cfg = {"mctsr": {"rollouts": 1}, "early_stop": False, "sparse": {"enabled": False}}
    together, apart = ScriptedBackend(math_script()), ScriptedBackend(math_script())
    a = solve("What is 40 + 2?", together, trees=4, config={**cfg, "lockstep": True})
    b = solve("What is 40 + 2?", apart, trees=4, config=cfg)
    assert max(len(x) for x in apart.batches) <= 2 < max(len(x) for x in together.batches)  # a reward: 2 requests
    assert sorted(str(r.prompt) for x in apart.batches for r in x) == sorted(
        str(r.prompt) for x in together.batches for r in x
    )
    assert a.answer == b.answer == "42" and b.usage.backend_calls == len(apart.batches)


def test_augmentation_per_tree():
    aug = ExampleRetriever()(MATH.parse("A train travels 50 km per hour for 3 hours. How far?"), 3, None)
    assert aug[0][1] == "" and "train" in aug[1][1].lower() and aug[1][1] != aug[2][1]
    import random

    shuffled = shuffle_numbers("4 6 1 10", 4, random.Random(0))
    assert shuffled[0][0] == "4 6 1 10"
    assert all(sorted(p.split()) == sorted("4 6 1 10".split()) for p, _ in shuffled)
    assert len({p for p, _ in shuffled}) > 1


def test_same_seed_same_solution():
    def respond(r: Request, j: int) -> str:  # depends on the seed the search chose: a sampling stand-in
        return (
            f"The answer is {(r.params.seed or 0) % 3}."
            if "Grade" not in content(r)
            else f"Score: {r.params.seed % 97}"
        )

    runs = [solve("What is 1 + 1?", ScriptedBackend(respond), trees=3, seed=5) for _ in range(2)]
    a, b = (s.model_dump(exclude={"usage"}) for s in runs)
    assert a == b
    assert solve("What is 1 + 1?", ScriptedBackend(respond), trees=3, seed=6).model_dump(exclude={"usage"}) != a


# ---- sparse activation --------------------------------------------------------------------------------------------
def test_both_kinds_of_tree_are_trees_and_say_what_pruning_saves():
    """The forest reaches into no tree: MCTSr and ToT are `Tree`s, and each says how many steps it has left."""
    mctsr = MCTSr(MathTask(), "What is 40 + 2?", MCTSrConfig(rollouts=3))
    tot = ToT(Game24Task(), "4 6 1 10")
    assert isinstance(mctsr, Tree) and isinstance(tot, Tree)
    assert mctsr.remaining_steps() == 3 and mctsr.corrections == 0
    assert tot.remaining_steps() == 2  # four numbers: two steps before the last two


def test_sparse_activation_prunes_trees_and_counts_saved_tokens():
    scores = iter([f"Score: {s}" for s in [90, 10, 80, 10, 20, 10, 60, 10]] + ["Score: 50"] * 100)

    def respond(r, j):
        return next(scores) if "Grade" in content(r) else math_script()(r, j)

    backend = ScriptedBackend(respond)
    # lock-step, so that the grades are handed out in a fixed order and the batches show who expands
    cfg = {"mctsr": {"rollouts": 2, "reward_samples": 1}, "early_stop": False, "sparse": {"top_k": 2}, "lockstep": True}
    sol = solve("What is 40 + 2?", backend, trees=4, config=cfg)
    critiques = [sum("Critique this answer" in content(r) for r in b) for b in backend.batches]
    assert max(critiques) == 2  # only the top 2 trees expand
    assert sol.usage.tree_steps_skipped == 2 * 2 and sol.usage.tokens_saved > 0
    dense = solve(
        "What is 40 + 2?", ScriptedBackend(math_script()), trees=4, config={**cfg, "sparse": {"enabled": False}}
    )
    assert dense.usage.generated_tokens > sol.usage.generated_tokens and dense.usage.tree_steps_skipped == 0


def test_sparse_activation_ranks_tot_trees_after_their_first_level():
    """Game of 24: every tree runs its first level before sparse activation ranks them. Ranked as bare roots (all
    valued 0) the first half of the trees were kept by their index and the rest dropped unexplored."""

    def respond(r, j):
        text = content(r)
        if "Evaluate if" in text:  # the state's numbers are the prompt's last line
            state = text.split()[-3:]
            return "sure" if len(set(state)) < 3 else "impossible"  # "1 10 10" is sure, "6 10 5" is not
        a, b, *rest = text.rsplit("Input: ", 1)[1].split("\n")[0].split()
        return f"{a} + {b} = {int(a) + int(b)} (left: {' '.join(rest)} {int(a) + int(b)})"

    backend = ScriptedBackend(respond)
    sol = solve("4 6 1 10", backend, trees=4, config={"early_stop": False})
    sent = [content(r) for b in backend.batches for r in b]
    first_value = next(i for i, text in enumerate(sent) if "Evaluate if" in text)
    assert sum("Possible next steps" in text for text in sent[:first_value]) == 4  # all four trees take a step
    best = [max(sol.graph(i).nodes[n]["value"] for n in sol.graph(i).successors(0)) for i in range(4)]
    pruned = [i for i in range(4) if "pruned_at_step" in sol.graph(i).graph]
    kept = [i for i in range(4) if i not in pruned]
    assert len(pruned) == 2 and len(set(best)) > 1  # the values differ, so the ranking is by value
    assert max(best[i] for i in pruned) <= min(best[i] for i in kept)


def test_tokens_saved_averages_only_the_steps_that_expanded_trees():
    """A last step where `min_score` pruned every tree expanded nothing, yet its 0 tokens entered the mean."""
    grades = iter(["Score: 80"] * 2 + ["Score: 10"] * 50)  # both trees expand once, then fall below min_score

    def respond(r, j):
        return next(grades) if "Grade the answer" in content(r) else math_script()(r, j)

    cfg = {"mctsr": {"rollouts": 3, "reward_samples": 1}, "early_stop": False, "sparse": {"min_score": 50}}
    sol = solve("What is 40 + 2?", ScriptedBackend(respond), trees=2, config={**cfg, "lockstep": True})
    step = len("Check the sum again.") + len("Adding up gives 42. The answer is 42.") + len("Score: 10")  # one tree
    assert sol.usage.tree_steps_skipped == 4 and sol.usage.tokens_saved == 4 * step


def test_min_score_stops_weak_trees():
    f = Forest("p", MATH, ForestConfig(sparse={"top_k": 4, "min_score": 50}), ScriptedBackend([]))

    class T:
        def __init__(self, s):
            self.s = s

        def score(self):
            return self.s

    trees = [T(70), T(40), T(55), T(10)]
    assert [t.s for t in f.activate(trees, trees)] == [70, 55]


# ---- self-correction ---------------------------------------------------------------------------------------------
def test_self_correction_triggers_and_keeps_the_better_answer():
    def out(text, lp):
        return Output(text=text, token_ids=[1, 2], finish_reason="stop", logprobs=[lp, lp])

    from fot.decoding.base import Completion

    sure = Completion(prompt_tokens=3, outputs=[out("The answer is 5.", -0.2)])
    unsure = Completion(prompt_tokens=3, outputs=[out("The answer is 6.", -2.5)])
    no_answer = Completion(prompt_tokens=3, outputs=[out("Hmm, hard.", -0.1)])
    backend = ScriptedBackend(lambda r, j: out("Checked: the answer is 7.", -0.5))
    usage = SolveUsage()
    fix = MathCorrector(MATH, -1.0, usage, seed=0)
    asked = [Request.make([{"role": "user", "content": "p"}])] * 3
    texts = asyncio.run(fix(Batcher(backend, 1).generate, "p", asked, [sure, unsure, no_answer]))
    assert texts == [
        ("The answer is 5.", None),
        ("Checked: the answer is 7.", "The answer is 6."),
        ("Checked: the answer is 7.", "Hmm, hard."),
    ]
    assert usage.corrections == 2 and len(backend.batches) == 1 and len(backend.batches[0]) == 2
    worse = ScriptedBackend(lambda r, j: out("The answer is 8.", -3.0))
    kept = asyncio.run(fix(Batcher(worse, 1).generate, "p", asked[:1], [unsure]))
    assert kept[0] == ("The answer is 6.", None)  # the better


# ---- CGED --------------------------------------------------------------------------------------------------------
def decide_with(answers, expert_reply="1", cot="The answer is 9."):
    backend = ScriptedBackend(lambda r, j: expert_reply if "Which candidate" in content(r) else cot)
    d = asyncio.run(decide(MATH, "p", answers, Batcher(backend, 1).generate))
    return d, backend


def test_cged_majority_plurality_expert_fallback():
    d, b = decide_with(["3", "3", "3.0", "4"])
    assert (d.answer, d.method, d.confidence, b.batches) == ("3", "majority", 0.75, [])
    d, _ = decide_with(["3", "3", "4", "5", None])
    assert (d.answer, d.method) == ("3", "plurality")
    d, b = decide_with(["3", "4", None, None], expert_reply="2")
    assert (d.answer, d.method) == ("4", "expert") and len(b.batches) == 1
    d, _ = decide_with(["3", "4"], expert_reply="0")  # the expert does not know: chain of thought decides
    assert (d.answer, d.method, d.confidence) == ("9", "fallback", 0.0)
    d, _ = decide_with([None, None, None])  # every tree said "I don't know"
    assert (d.answer, d.method) == ("9", "fallback")


def test_a_fallback_of_several_chains_votes_with_the_trees():
    """fallback_samples=N: where the trees tie and the expert does not know, N sampled chains of thought vote
    together with the trees (one request of n=N, seeded as self-consistency's); a tie that remains goes to the
    answer seen first."""

    def respond(r: Request, j: int) -> str:
        if "Which candidate" in content(r):
            return "0"
        return ["The answer is 4.", "The answer is 5.", "The answer is 4."][j]

    backend = ScriptedBackend(respond)
    d = asyncio.run(decide(MATH, "p", ["3", "4", "5", "6"], Batcher(backend, 1).generate, samples=3, seed=7))
    assert (d.answer, d.method, d.votes) == ("4", "fallback", {"3": 1, "4": 1, "5": 1, "6": 1})  # 4: 3 votes
    [_, [sampled]] = backend.batches
    assert (sampled.params.n, sampled.params.seed, sampled.params.temperature) == (3, 7, 0.7)
    tied = ScriptedBackend(lambda r, j: "0" if "Which candidate" in content(r) else f"The answer is {5 + j}.")
    d = asyncio.run(decide(MATH, "p", ["5", "6"], Batcher(tied, 1).generate, samples=2))
    assert d.answer == "5"  # 2-2: the first tree's
    none = ScriptedBackend(lambda r, j: "The answer is 8." if j else "I cannot tell.")
    assert asyncio.run(decide(MATH, "p", [None, None], Batcher(none, 1).generate, samples=2)).answer == "8"
    puzzle = ScriptedBackend(lambda r, j: ["Answer: 4 * 6 = 24", "Answer: (10 - 4) * (6 - 1) = 24"][j])
    d = asyncio.run(decide(GAME, "4 6 1 10", [None, None], Batcher(puzzle, 1).generate, samples=2))
    assert d.answer is None  # each sampled answer is rechecked, and neither uses the puzzle's numbers right
    with pytest.raises(ValueError, match="fallback_samples is for method 'fot'"):
        ForestConfig(method="sc", fallback_samples=4)


def test_a_failed_expert_request_fails_the_solve():
    """Two trees tie, and the expert's request fails: the decision falls back, but the search lost a request, so
    it has no result."""
    answers = itertools.cycle(["3", "4"])

    def respond(r: Request, j: int) -> str | Exception:
        text = content(r)
        if "Which candidate" in text:
            return RuntimeError("expert down")
        return "Score: 80" if "Grade the answer" in text else f"The answer is {next(answers)}."

    with pytest.raises(SearchError, match="1 of .* backend requests failed.*expert down") as failure:
        solve("What is 40 + 2?", ScriptedBackend(respond), trees=2, config={"early_stop": False})
    assert failure.value.solution.decision == "fallback"


def test_a_slow_comparison_leaves_the_event_loop_free():
    """math-verify can take seconds on one comparison: the vote waits for it in a worker thread, so that a server's
    other requests go on meanwhile."""

    class Slow(MathTask):
        def equivalent(self, a: str, b: str, strict: bool = False) -> bool:
            time.sleep(0.3)
            return False

    async def vote() -> str | None:
        gen = Batcher(ScriptedBackend(lambda r, j: ""), 1).generate
        return (await decide(Slow(), "p", ["3", "4", "3"], gen)).answer

    answer, ticks = asyncio.run(ticks_during(vote()))
    assert answer == "3" and ticks >= 10  # the loop ticked on through the 0.3 s comparison


def test_fallback_chain_of_thought_runs_the_checks():
    """No tree answered: the fallback's chain of thought goes through the forest's corrector, so its made-up
    code output is repaired as the trees' would be."""
    reply = "```python\nprint(6 * 7)\n```\n```output\n41\n```\nThe answer is 41."
    backend = ScriptedBackend(lambda r, j: reply)
    usage = SolveUsage()
    corrector = MathCorrector(MATH, -math.inf, usage, 0, checks=MATH.checks, refine=False)
    d = asyncio.run(decide(MATH, "p", [None, None], Batcher(backend, 1).generate, corrector=corrector))
    assert (d.answer, d.method) == ("42", "fallback") and usage.code_repairs == 1


def test_early_stop_on_a_majority():
    backend = ScriptedBackend(math_script())
    sol = solve("What is 40 + 2?", backend, trees=4, config={"mctsr": {"rollouts": 4}})
    assert sol.decision == "majority" and sol.answer == "42"
    assert not any("Critique this answer" in content(r) for b in backend.batches for r in b)  # no rollout needed


# ---- Game of 24 with ToT -----------------------------------------------------------------------------------------
def test_tot_checks_corrects_and_solves_exactly():
    def respond(r, j):
        text = content(r)
        if "Evaluate if" in text:
            return "sure"
        numbers = text.rsplit("Input: ", 1)[1].split("\n")[0]
        return {
            "4 6 1 10": "4 + 6 = 11 (left: 1 11 10)\n7 * 7 = 49 (left: 1 49 10)\n4 - 1 = 3 (left: 3 6 10)",
            "1 10 10": "10 + 10 = 20 (left: 1 20)",
            "6 10 3": "10 * 3 = 30 (left: 6 30)",
        }.get(numbers, "")

    tree = ToT(GAME, "4 6 1 10", seed=0, correct=True)
    backend = ScriptedBackend(respond)
    for _ in range(2):
        asyncio.run(run_step(Batcher(backend, 1), [tree.step(Batcher(backend, 1).generate)]))
    assert tree.corrections == 1 and tree.rejected == 1  # 4 + 6 = 11 repaired; 7 * 7 dropped
    assert tree.done and tree.answer() is not None
    assert GAME.check("4 6 1 10", f"Answer: {tree.answer()}") == []
    assert parse_value("10 14\nsure") == 20 and parse_value("nothing") == 0.001
    strict = ToT(GAME, "4 6 1 10", seed=0, correct=False)
    asyncio.run(strict.step(Batcher(backend, 1).generate))
    assert strict.rejected == 2 and strict.corrections == 0


def test_game24_answers_and_verdicts_are_the_puzzle_s_own_not_those_of_puzzles_the_model_goes_on_to():
    """A few-shot prompt with no stop: the model went on to a puzzle of its own, and chain of thought read that
    puzzle's "Answer:" (every cot answer of the 1.5B model's committed run), ToT took its proposals as steps and its
    verdict as the state's value."""
    from fot.trees.cot import chain_of_thought

    run_on = "\nInput: 1 2 3 4\nSteps:\n1 + 2 = 3 (left: 3 3 4)\nAnswer: (1 + 2 + 3) * 4 = 24\n"
    cot = ScriptedBackend(lambda r, j: "12 * 2 = 24 (left: 9 10 24)\nAnswer: (12 * 2) * (10 - 9) = 24" + run_on)
    answer, done = asyncio.run(chain_of_thought(Batcher(cot, 1).generate, GAME, "2 9 10 12"))
    assert answer == "(12 * 2) * (10 - 9)" and "Input:" not in done.text

    assert parse_value("4 * 6 = 24\nsure\n1 1 1\n1 + 1 + 1 = 3\nimpossible") == 20  # its own verdict, the first
    assert parse_value("4 + 6 = 10\nlikely\n2 2 2\nsure") == 1
    assert parse_value("I am unsure") == 0.001 and parse_value("Sure.") == 20

    def respond(r, j):
        if "Evaluate if" in content(r):
            return "likely"
        return "4 + 6 = 10 (left: 1 10 10)\nInput: 4 6 2 2\nPossible next steps:\n6 - 4 = 2 (left: 1 2 10)"

    tree = ToT(GAME, "4 6 1 10", seed=0, correct=True)
    asyncio.run(tree.step(Batcher(ScriptedBackend(respond), 1).generate))
    assert [tree.tree[n]["numbers"] for n in tree.frontier] == [["1", "10", "10"]]  # not 6 - 4 of the made-up one


def test_a_single_tree_without_an_answer_has_no_confidence():
    """It reported confidence 1.0 for no answer (chain of thought, in the same case, 0.0)."""
    sol = solve("4 6 1 10", ScriptedBackend(lambda r, j: "no steps"), method="tot")
    assert (sol.answer, sol.decision, sol.confidence, sol.votes) == (None, "single", 0.0, {})


def test_a_game24_fallback_answer_that_fails_the_check_is_no_answer():
    """No tree reached 24 and the fallback's chain of thought answered "4 * 6", which leaves 1 and 10 unused: it was
    the forest's answer, unchecked (13 of 50 FoT-4 answers of the committed 1.5B run were fallbacks)."""
    for reply, answer in [("Answer: 4 * 6 = 24", None), ("Answer: (10 - 4) * (6 - 1) = 24", None)]:
        backend = ScriptedBackend(lambda r, j, reply=reply: reply)
        d = asyncio.run(decide(GAME, "4 6 1 10", [None, None], Batcher(backend, 1).generate))
        assert (d.answer, d.method) == (answer, "fallback")
    backend = ScriptedBackend(lambda r, j: "Answer: (12 * 2) * (10 - 9) = 24")
    d = asyncio.run(decide(GAME, "2 9 10 12", [None, None], Batcher(backend, 1).generate))
    assert (d.answer, d.method) == ("(12 * 2) * (10 - 9)", "fallback")


def test_tot_counts_a_correction_only_where_it_makes_a_state():
    """A wrong step whose repaired state was already proposed is merged into it: no node, so no correction (the
    count had included these)."""
    tree = ToT(GAME, "4 6 1 10", seed=0, correct=True)
    proposals = "4 + 6 = 10 (left: 1 10 10)\n4 + 6 = 11 (left: 1 11 10)\n1 + 4 = 6 (left: 6 6 10)"
    assert len(tree.expand(0, proposals)) == 2 and tree.corrections == 1  # 1 + 4 = 6 repaired to 5


def test_tot_takes_steps_with_a_zero_and_rejects_division_by_zero():
    """A state holding 0 (after 4 - 4): "10 + 0" is a valid step and "10 / 0" is rejected; neither may crash the
    tree (a 1.5B model's proposals once raised ZeroDivisionError out of the whole search)."""

    def respond(r, j):
        if "Evaluate if" in content(r):
            return "likely"
        numbers = content(r).rsplit("Input: ", 1)[1].split("\n")[0]
        return {"4 4 10 14": "4 - 4 = 0 (left: 0 10 14)", "10 14 0": "10 + 0 = 10 (left: 10 14)\n10 / 0 = 1"}.get(
            numbers, ""
        )

    tree = ToT(GAME, "4 4 10 14", seed=0, correct=True)
    backend = ScriptedBackend(respond)
    for _ in range(2):
        asyncio.run(tree.step(Batcher(backend, 1).generate))
    assert tree.rejected == 1 and tree.done
    assert tree.answer() is not None and GAME.check("4 4 10 14", f"Answer: {tree.answer()}") == []


def test_game24_solve_end_to_end_with_scripted_model():
    def respond(r, j):
        text = content(r)
        if "Evaluate if" in text:
            return "likely"
        return "4 - 1 = 3 (left: 3 6 10)\n10 * 3 = 30 (left: 6 30)"

    sol = solve("4 6 1 10", ScriptedBackend(respond), trees=2)
    assert sol.task == "game24" and sol.answer is not None
    assert GAME.check("4 6 1 10", f"Answer: {sol.answer}") == []


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "problem, kw",
    [
        ("", {}),
        (42, {}),
        ("What is 1 + 1?", {"task": "chess"}),
        ("What is 1 + 1?", {"method": "beam"}),
        ("What is 1 + 1?", {"trees": 0}),
        ("4 6 10", {"task": "game24"}),
        ("What is 1 + 1?", {"method": "tot"}),
    ],
)
def test_bad_input_is_a_clear_error(problem, kw):
    backend = ScriptedBackend([])
    with pytest.raises(InvalidRequestError):
        solve(problem, backend, **kw)
    assert backend.batches == []


CODE_ANSWER = (
    "Let's compute.\n```python\nchange = 100 - 3 * 12.5 - 2 * 28\nprint(change)\n```\n```output\n10.0\n```\n{rest}"
)


def test_made_up_code_output_is_repaired_with_the_real_one():
    """Program-aided self-correction: an answer whose code does not print what it claimed gets the real output.
    Where the answer only restated the made-up number, the real one is the answer with no request; where it went
    on reasoning, the model continues from the corrected prefix, in the same batch as the refines."""
    from fot.decoding.base import Completion

    def done(text, lp=-0.1):
        return Completion(
            prompt_tokens=3, outputs=[Output(text=text, token_ids=[1], finish_reason="stop", logprobs=[lp])]
        )

    restates = done(CODE_ANSWER.format(rest="The change is \\(\\boxed{10.0}\\)."))
    goes_on = done(CODE_ANSWER.format(rest="He then spends 2 more, so he has 8 left. The answer is 8."))
    right = done(CODE_ANSWER.replace("10.0", "6.5").format(rest="The answer is 6.5."))
    unsure = done("The answer is 6.", lp=-2.5)
    backend = ScriptedBackend(lambda r, j: "He spends 2 more: 4.5 left. The answer is 4.5.")
    usage = SolveUsage()
    fix = MathCorrector(MATH, -1.0, usage, seed=0)
    asked = [Request.make([{"role": "user", "content": f"question {i}"}]) for i in range(4)]
    kept = asyncio.run(fix(Batcher(backend, 1).generate, "p", asked, [restates, goes_on, right, unsure]))
    fixed = "Let's compute.\n```python\nchange = 100 - 3 * 12.5 - 2 * 28\nprint(change)\n```\n```output\n6.5\n```\n"
    assert kept[0] == (fixed + "The answer is 6.5.", restates.text)
    assert kept[1] == (fixed + "He spends 2 more: 4.5 left. The answer is 4.5.", goes_on.text)
    assert kept[2] == (right.text, None)
    assert (usage.code_checks, usage.code_failures, usage.code_repairs) == (3, 2, 2)
    [batch] = backend.batches  # one continuation and one refine, together
    continuation, refine = batch
    assert continuation.prompt == [asked[1].prompt[0], {"role": "assistant", "content": fixed}]
    assert "Previous answer: The answer is 6." in refine.prompt[0]["content"]
    off = MathCorrector(MATH, -1.0, SolveUsage(), seed=0, checks={})
    assert asyncio.run(off(Batcher(backend, 1).generate, "p", asked[:1], [restates]))[0] == (restates.text, None)


@pytest.mark.parametrize(
    "code, claimed, answer",
    [
        ("print(2.5e9 * 5)", "1250000000.0", "12500000000"),  # Python prints 12500000000.0; .10g wrote 1.25e+10
        ("print(1 / 20000)", "0.0005", "0.00005"),  # Python prints 5e-05
        ("print(0.1 + 0.2)", "0.4", "0.3"),
        ("print(123456789012.5)", "5", "123456789012.5"),  # 10 significant digits wrote 123456789000
        ("from sympy import Rational\nprint(Rational(7, 2))", "4.5", "7/2"),  # was "2", the denominator
    ],
)
def test_a_restated_repair_writes_the_real_number_plainly(code, claimed, answer):
    """The answer taken from a corrected code output was written in exponent form past 10 digits, which the
    answer's parsing does not read as that number; a printed fraction gave its denominator."""
    from fot.decoding.base import Completion

    text = f"```python\n{code}\n```\n```output\n{claimed}\n```\nThe answer is {claimed}."
    done = Completion(prompt_tokens=3, outputs=[Output(text=text, token_ids=[1], finish_reason="stop", logprobs=[0.0])])
    fix = MathCorrector(MATH, -1.0, SolveUsage(), seed=0)
    asked = [Request.make([{"role": "user", "content": "question"}])]
    [(repaired, _)] = asyncio.run(fix(Batcher(ScriptedBackend(lambda r, j: "unused"), 1).generate, "p", asked, [done]))
    assert repaired.endswith(f"The answer is {answer}.") and MATH.extract(repaired) == answer


def test_a_seed_is_refused_before_any_work_where_its_requests_seeds_would_overflow():
    """Requests are seeded from seed * 1000 on: a seed the config took failed at the first request, mid-search."""
    backend = ScriptedBackend(lambda r, j: "The answer is 4.")
    assert solve("What is 2 + 2?", backend, trees=2, seed=2**53 - 1).answer == "4"
    sent = len(backend.batches)
    with pytest.raises(InvalidRequestError, match="seed"):
        solve("What is 2 + 2?", backend, trees=2, seed=2**53)
    assert len(backend.batches) == sent  # the refused seed sent nothing


def test_self_consistency_counts_equivalent_answers_as_one_vote():
    """sc's votes and confidence counted raw strings: "3.5" and "7/2" split, though the answer grouped them."""
    replies = ["The answer is 3.5.", "The answer is 7/2.", "The answer is 4."]
    sol = solve("What is 7 / 2?", ScriptedBackend(lambda r, j: replies[j]), method="sc", trees=3, task="math")
    assert sol.answer == "3.5" and sol.votes == {"3.5": 2, "4": 1} and sol.confidence == pytest.approx(2 / 3)


@pytest.mark.parametrize("baselines", [False, True])
def test_cot_and_sc_take_the_code_checks_only_when_asked(baselines):
    made_up = CODE_ANSWER.format(rest="So the change is 10.0. The answer is 10.0.")
    backend = ScriptedBackend(lambda r, j: Output(text=made_up, token_ids=[1], finish_reason="stop", logprobs=[-3.0]))
    config = {"correction": {"baselines": baselines}, "trees": 3}
    for method, n in (("cot", 1), ("sc", 3)):
        sol = asyncio.run(asolve("What change from 100?", task="math", method=method, backend=backend, config=config))
        assert sol.tree_answers == (["6.5"] * n if baselines else ["10"] * n)
        assert (sol.usage.code_checks, sol.usage.code_repairs) == ((n, n) if baselines else (0, 0))
        assert sol.usage.requests == 1  # restated answers need no continuation, and no refine runs for baselines
