"""The arithmetic check of prose (fot.tasks.checks.check_arithmetic), rule checks as a task's plug-in, and the
repair that continues from the corrected prefix."""

from __future__ import annotations

import asyncio
import time
from types import MappingProxyType

import pytest
from loop import ticks_during

from fot.correction import MathCorrector
from fot.decoding.base import Completion, Output, Request
from fot.decoding.scripted import ScriptedBackend
from fot.forest import SolveUsage, asolve
from fot.tasks import MathTask
from fot.tasks.checks import Failure, Finding, check_arithmetic, check_code, last_number, same_output
from fot.trees.base import Batcher

# statements the checker must accept: recomputed, and right
ACCEPT = [
    "3 + 4 = 7",
    "He pays 3 * $4 = $12 in all.",
    "5 apples + 3 apples = 8 apples",
    "5 sq ft * 3 = 15 sq ft",
    "The trip takes 2.5 hours * 60 = 150 minutes.",
    "She earns $1,200 * 12 = $14,400 a year.",
    "It costs $1,200.50 * 2 = $2,401",
    "20% of $50 = $10",
    "50 * 20% = 10",
    "100% - 20% = 80%",
    "25 / 100 = 0.25",
    "1.5 + 2.25 = 3.75",
    "3/4 * 12 = 9",
    "\\frac{3}{4} \\times 12 = 9",
    "\\( 3 \\times 4 = 12 \\)",
    "12 \\div 4 = 3",
    "3 x 4 = 12, and 3×5 = 15",
    "3 times 4 = 12",
    "(2 + 3) * 4 = 20",
    "2^10 = 1024",
    "5 - 8 = -3",
    "**3 + 4 = 7**",
    "- 3 + 4 = 7",  # a list item's dash, not a minus
    "Total = 3 + 4 = 7 dollars",
    "2 + 3 + 4 + 5 = 14",
    "2 * 3 = 6 * 4 = 24",  # a running chain: each link checked
    "10 / 4 = 2 full boxes",  # a floor the problem asks for
    "Round to the nearest dollar: 100 / 3 = 33",
    "2 / 3 = 0.67",  # rounded as shown
    "2 / 3 = 0.666",  # cut as shown
    "So 12 / 7 = 1.71 hours",
    "3 * 4 = \\boxed{12}",
    "She has 5 apples and 3 * 4 = 12",
    "He pays 100 \u2212 3 \u00d7 12.50 = 62.50 dollars.",  # a Unicode minus: the whole statement, not 3 × 12.50
]

# statements it must reject, each with (claimed, actual, the corrected prefix)
REPAIR = [
    ("3 + 4 = 8 apples.", ("8", "7", "3 + 4 = 7")),
    ("Then 5 apples + 3 apples = 9 apples", ("9", "8", "Then 5 apples + 3 apples = 8")),
    ("Cost: 1,200 * 2 = $2,500 total", ("2,500", "2,400", "Cost: 1,200 * 2 = $2,400")),
    ("20% of $50 = $12", ("12", "10", "20% of $50 = $10")),
    ("100% - 20% = 70% of the price", ("70", "80", "100% - 20% = 80")),
    ("He pays 7.5 * 2 = 14 dollars", ("14", "15", "He pays 7.5 * 2 = 15")),
    ("2 / 3 = 0.5", ("0.5", "0.67", "2 / 3 = 0.67")),
    ("12 / 8 = 1.4", ("1.4", "1.5", "12 / 8 = 1.5")),
    ("5 - 8 = 3", ("3", "-3", "5 - 8 = -3")),
    ("(2 + 3) * 4 = 24", ("24", "20", "(2 + 3) * 4 = 20")),
    ("\\( 3 \\times 4 = 13 \\)", ("13", "12", "\\( 3 \\times 4 = 12")),
    ("3 * 4 = \\boxed{11}", ("11", "12", "3 * 4 = \\boxed{12")),
    ("2^10 = 1000", ("1000", "1024", "2^10 = 1024")),
    ("He pays 100 \u2212 3 \u00d7 12.50 = 60.", ("60", "62.5", "He pays 100 \u2212 3 \u00d7 12.50 = 62.5")),
    ("First 2 + 2 = 4. Then 4 * 3 = 11. So 11 + 1 = 12.", ("11", "12", "First 2 + 2 = 4. Then 4 * 3 = 12")),
]

# text that only looks like arithmetic: nothing is checked, nothing judged
NOT_ARITHMETIC = [
    "On 2024-03-15 she had 3-4 apples.",
    "Call 555-123-4567 to order.",
    "From 9-5 on weekdays.",
    "The date is 12/25/2023.",
    "2:30 + 45 = 3:15",  # times
    "Step 1 - 3 + 4 = 7",  # a label, not 1 - 3 + 4
    "Day 3 - 1 = 2 weeks later",
    "x2 + 3 = 6",  # algebra
    "2x + 3x = 5x",
    "So 10n + 9 + 26 = 10",  # a variable glued to its coefficient (seen in a model's answer)
    "2H + 100 = 184",
    "9 + 2n = 19",
    "3 + 4 = 7n",
    "1 1/2 = 1.5",  # a mixed number
    "3 hundred + 5 = 305",  # a scale word
    "0.25 * 100 = 25%",  # a conversion to a percentage
    "$50 + 20% = $60",  # a markup, not 50.2
    "3 + 4 = 10 - 3",  # the right side is an expression
    "199 \\times 60 = 15 \\times x",  # cross-multiplying (seen in a model's answer)
    "Total time = 7 hours + 20 minutes = 7.30 hours.",  # different units (seen in a model's answer)
    "12 / 4 = 3/4",  # a fraction on the right
    "v1.2 + 1 = 3",
    "2 * 10^99999 = 5",  # beyond the interpreter's bounds: refused, not judged
    "10^20 + 1 = 5",  # a result past 10^15: notation more often than arithmetic
    "2 + 2 = " + "9" * 5000,  # no claim: past 4300 digits int() would refuse it
    "3 + " + "4" * 5000 + " = 7",
    "The answer is 12.",
    "```python\nx = 3 + 4 = 8\n```",  # code is the code check's
    "Let c be the cost. Then c \u00d7 3 + 2 = 38, so c = 12.",  # an operator with no number on its left
    "Then x * 3 + 2 = 38",
    "The area is \u03c0 \u00d7 5^2 = 78.5.",
    "The area is \\pi \\times 5^2 = 78.5.",
    "So \u221a16 + 2 = 6.",
    "So x**3 + 4 = 31.",  # a power of a variable, not 3 + 4
    "Ages 3\u20135 = 2 years",  # an en dash is a range
]


@pytest.mark.parametrize("text", ACCEPT)
def test_right_statements_are_recomputed_and_pass(text):
    found = check_arithmetic("", text)
    assert found.checked >= 1 and found.failure is None


@pytest.mark.parametrize(("text", "wrong"), REPAIR)
def test_wrong_statements_are_cut_at_the_claim_and_corrected(text, wrong):
    found = check_arithmetic("", text)
    f = found.failure
    assert f is not None and f.kind == "arithmetic"
    assert (f.claimed, f.actual, f.prefix) == wrong
    assert text[: f.at] + f.actual == f.prefix and f.rest == text[f.at + len(f.claimed) :]


@pytest.mark.parametrize("text", NOT_ARITHMETIC)
def test_text_that_only_looks_like_arithmetic_is_not_judged(text):
    assert check_arithmetic("", text) == Finding(0, None)


def test_the_first_wrong_statement_is_the_one_repaired_and_counts_stop_there():
    found = check_arithmetic("", "2 + 2 = 4, 3 + 3 = 7, 4 + 4 = 9")
    assert found.checked == 2 and found.failure.claimed == "7"


def done(text: str, lp: float = -0.1) -> Completion:
    return Completion(prompt_tokens=3, outputs=[Output(text=text, token_ids=[1], finish_reason="stop", logprobs=[lp])])


def test_a_repair_continues_from_the_corrected_prefix_batched_with_the_other_work():
    wrong = done("He buys 3 boxes of 12, so 3 * 12 = 38 eggs. He uses 8: 38 - 8 = 30. The answer is 30.")
    code = done("```python\nprint(6 * 7)\n```\n```output\n40\n```\nSo she pays 40 and then 2 more. The answer is 42.")
    unsure = done("The answer is 6.", lp=-2.5)
    backend = ScriptedBackend(lambda r, j: " eggs. He uses 8: 36 - 8 = 28. The answer is 28.")
    usage = SolveUsage()
    fix = MathCorrector(MathTask(), -1.0, usage, seed=0)
    asked = [Request.make([{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    kept = asyncio.run(fix(Batcher(backend, 1).generate, "p", asked, [wrong, code, unsure]))
    assert kept[0] == (
        "He buys 3 boxes of 12, so 3 * 12 = 36 eggs. He uses 8: 36 - 8 = 28. The answer is 28.",
        wrong.text,
    )
    [batch] = backend.batches  # two continuations and one refine, in one batch
    assert len(batch) == 3
    assert batch[0].prompt == [
        asked[0].prompt[0],
        {"role": "assistant", "content": "He buys 3 boxes of 12, so 3 * 12 = 36"},
    ]
    assert batch[1].prompt[-1] == {"role": "assistant", "content": "```python\nprint(6 * 7)\n```\n```output\n42\n```\n"}
    assert "Previous answer: The answer is 6." in batch[2].prompt[0]["content"]
    assert (usage.arithmetic_checks, usage.arithmetic_failures, usage.arithmetic_repairs) == (1, 1, 1)
    assert (usage.code_checks, usage.code_failures, usage.code_repairs) == (1, 1, 1)
    assert [(r.kind, r.claimed, r.actual) for r in fix.repairs] == [("arithmetic", "38", "36"), ("code", "40", "42")]


def test_the_earliest_wrong_claim_is_repaired_whichever_check_finds_it():
    text = "First 2 * 5 = 12.\n```python\nprint(6 * 7)\n```\n```output\n40\n```\nThe answer is 40."
    fix = MathCorrector(MathTask(), -1.0, SolveUsage(), seed=0)
    assert fix.failure(fix.findings("p", done(text))).kind == "arithmetic"
    only_code = MathCorrector(MathTask(), -1.0, SolveUsage(), seed=0, checks={"code": check_code})
    assert only_code.failure(only_code.findings("p", done(text))).kind == "code"
    unrunnable = "```python\nimport os\nprint(4)\n```\n```output\n5\n```\nThe answer is 5."
    assert only_code.failure(only_code.findings("p", done(unrunnable))) is None
    assert (only_code.usage.code_checks, only_code.usage.code_skipped) == (1, 1)  # counted, not judged


def test_a_slow_check_leaves_the_event_loop_free():
    """A code check runs the model's code for up to its step budget (about a second): in a worker thread, so that a
    server's other requests go on meanwhile."""

    def slow(problem: str, text: str) -> Finding:
        time.sleep(0.3)
        return Finding(checked=1)

    fix = MathCorrector(MathTask(), -1.0, SolveUsage(), seed=0, checks={"code": slow}, refine=False)
    asked = [Request.make([{"role": "user", "content": "q"}])]

    async def check() -> list:
        return await fix(Batcher(ScriptedBackend(lambda r, j: ""), 1).generate, "p", asked, [done("The answer is 5.")])

    kept, ticks = asyncio.run(ticks_during(check()))
    assert kept == [("The answer is 5.", None)] and fix.usage.code_checks == 1
    assert ticks >= 10  # the loop ticked on through the 0.3 s check


def test_a_slow_comparison_in_a_repair_leaves_the_event_loop_free():
    """Taking a corrected code output as the answer first asks whether the answer only restated the made-up one,
    which can wait on math-verify: in a worker thread too."""

    class Slow(MathTask):
        def equivalent(self, a: str, b: str, strict: bool = False) -> bool:
            time.sleep(0.3)
            return a == b

    fix = MathCorrector(Slow(), -1.0, SolveUsage(), seed=0, refine=False)
    made_up = done("```python\nprint(6 * 7)\n```\n```output\n40\n```\nThe answer is 40.")
    asked = [Request.make([{"role": "user", "content": "q"}])]

    async def repair() -> list:
        return await fix(Batcher(ScriptedBackend(lambda r, j: ""), 1).generate, "p", asked, [made_up])

    kept, ticks = asyncio.run(ticks_during(repair()))
    assert kept[0][0].endswith("The answer is 42.") and fix.usage.code_repairs == 1
    assert ticks >= 10  # the loop ticked on through the 0.3 s comparison


class Units(MathTask):
    """A task with a check of its own: any answer that says 'furlongs' is repaired to metres."""

    def furlongs(self, problem: str, text: str) -> Finding:
        at = text.find("furlongs")
        if at < 0:
            return Finding(0)
        return Finding(1, Failure("units", "furlongs", "furlongs", "metres", at, text[:at] + "metres", text[at + 8 :]))

    @property
    def checks(self):
        return MappingProxyType({"units": self.furlongs})


def test_checks_are_the_tasks_own_and_the_config_switches_the_math_ones():
    replies = {"units": "It is 3 furlongs. The answer is 3.", "plain": "So 2 + 2 = 5. The answer is 5."}
    backend = ScriptedBackend(lambda r, j: replies[r.prompt[0]["content"]] if r.prompt[-1]["role"] == "user" else
                              " away. The answer is 603.")  # fmt: skip
    fix = MathCorrector(Units(), -1.0, SolveUsage(), seed=0, refine=False)
    kept = asyncio.run(fix(Batcher(backend, 1).generate, "p", [Request.make([{"role": "user", "content": "units"}])],
                           [done(replies["units"])]))  # fmt: skip
    assert kept == [("It is 3 metres away. The answer is 603.", replies["units"])]
    assert [r.kind for r in fix.repairs] == ["units"]
    from fot.forest import CorrectionConfig

    assert set(CorrectionConfig().checks(MathTask())) == {"code", "arithmetic"}
    assert set(CorrectionConfig(arithmetic=False).checks(MathTask())) == {"code"}
    assert CorrectionConfig(enabled=False).checks(MathTask()) == {}
    assert set(CorrectionConfig(code=False, arithmetic=False).checks(Units())) == {"units"}


@pytest.mark.parametrize(("method", "repaired"), [("mctsr", True), ("cot", False), ("sc", False)])
def test_mctsr_runs_the_checks_by_default_and_the_baselines_only_when_asked(method, repaired):
    def reply(r, j):
        if r.prompt[-1]["role"] == "assistant":
            return ". The answer is 6."
        text = r.prompt[-1]["content"]
        if "score" in text.lower() or "reward" in text.lower():
            return "Score: 50"
        return "So 2 * 3 = 7. The answer is 7."

    backend = ScriptedBackend(reply)
    config = {"trees": 2, "mctsr": {"rollouts": 0}}
    sol = asyncio.run(asolve("What is 2 times 3?", task="math", method=method, backend=backend, config=config))
    assert (sol.usage.arithmetic_repairs > 0) == repaired
    assert (sol.answer == "6") == repaired
    assert [(r.claimed, r.actual) for r in sol.repairs] == ([("7", "6")] if repaired else [])
    if not repaired:
        config["correction"] = {"baselines": True}
        sol = asyncio.run(asolve("What is 2 times 3?", task="math", method=method, backend=backend, config=config))
        assert sol.answer == "6" and sol.usage.arithmetic_repairs >= 1


def test_program_of_thought_asks_the_last_trees_for_code_never_tree_0():
    from fot.augment import PROGRAM, program_of_thought

    inputs = [("p", ""), ("p", "ex1"), ("p", "ex2"), ("p", "ex3")]
    assert program_of_thought(inputs, 2) == [("p", ""), ("p", "ex1"), ("p" + PROGRAM, "ex2"), ("p" + PROGRAM, "ex3")]
    assert program_of_thought(inputs, 9)[0] == ("p", "") and program_of_thought(inputs, 0) == inputs
    asked = []

    def reply(r, j):
        asked.append(r.prompt[-1]["content"])
        return "Score: 50" if "grader" in asked[-1] else "The answer is 4."

    sol = asyncio.run(asolve("What is 2 + 2?", task="math", backend=ScriptedBackend(reply),
                             config={"trees": 3, "program_trees": 1, "mctsr": {"rollouts": 0}}))  # fmt: skip
    answers = [a for a in asked if a.startswith("Solve the problem")]
    assert len(answers) == 3 and sum(PROGRAM in a for a in answers) == 1 and sol.answer == "4"


def expressions():
    """(text, value) of random arithmetic over small integers, the value computed alongside the text."""
    from hypothesis import strategies as st

    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    written = {"+": ["+"], "-": ["-"], "*": ["*", "×", "x"]}

    def combine(inner):
        def make(t):
            (a, va), op, (b, vb), how = t
            return f"({a} {written[op][how % len(written[op])]} {b})", apply[op](va, vb)

        return st.tuples(inner, st.sampled_from(sorted(apply)), inner, st.integers(0, 2)).map(make)

    leaf = st.integers(0, 999).map(lambda n: (str(n), n))
    return st.recursive(leaf, combine, max_leaves=5).map(lambda e: (e[0][1:-1], e[1]) if e[0].startswith("(") else e)


def test_random_statements_are_accepted_when_right_and_repaired_when_wrong():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(expressions(), st.integers(1, 50), st.sampled_from(["So ", "Then ", "- ", "**", ""]))
    def check(expression, off, lead):
        expr, value = expression
        if expr.isdigit() or abs(value) > 10**15:
            return
        right = check_arithmetic("", f"{lead}{expr} = {value} in all.")
        assert right.checked == 1 and right.failure is None
        wrong = check_arithmetic("", f"{lead}{expr} = {value + off} in all.").failure
        assert wrong is not None and wrong.actual == str(value) and wrong.prefix == f"{lead}{expr} = {value}"

    check()


def test_any_text_is_read_without_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from(list("0123456789 +-*/x=%$.,:()^\\{}abc\n`") + ["\\frac", "\\times", "**"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(alphabet, max_size=60).map("".join))
    def check(text):
        found = check_arithmetic("", text)
        if found.failure is not None:
            f = found.failure
            assert text[: f.at] + f.actual == f.prefix and f.claimed in text

    check()


def test_the_words_nan_and_inf_are_words_not_numbers():
    """float() reads them, and nan never equals itself, so a claimed `nan` that the code printed was "wrong"."""
    assert same_output("result: nan", "result: nan") and same_output("inf", "inf")
    assert not same_output("nan", "inf") and not same_output("nan", "0")
    assert last_number("5 apples, or nan") == "5" and last_number("Infinity") is None


def test_a_printed_fraction_is_one_number():
    """sympy prints 7/2; read as 7, / and 2, a right claimed 3.5 was "wrong" and 2 was taken as the answer."""
    assert same_output("3.5", "7/2") and not same_output("4.5", "7/2") and last_number("It is 7/2.") == "7/2"
    code = "```python\nfrom sympy import Rational\nprint(Rational(7, 2))\n```\n```output\n3.5\n```\nThe answer is 3.5."
    assert check_code("", code).failure is None
    assert same_output("12/25/2023", "12/25/2023") and same_output("1/0", "1/0")  # a date, a division: as text


def test_whole_values_are_the_same_output_only_when_equal():
    """At 1e-6 relative, a made-up 10000000 for a printed 10000009 passed the check."""
    assert not same_output("10000000", "10000009") and not same_output("1,000,001", "1000000")
    assert not same_output("10000000", "10000009.0") and not same_output("10000000", "1.0000009e7")  # printed floats
    assert same_output("3", "3.0000000000000004") and same_output("2", "4/2")  # rounding noise; a whole fraction
    assert same_output("1" * 400 + "/1", "1" * 400 + "/1")  # past a float's range: it raised OverflowError
    assert same_output("1,000", "1000") and same_output("10", "10.0") and same_output("9" * 5000, "9" * 5000)
