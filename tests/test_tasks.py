"""Tasks: answer extraction and equivalence for math, the Game of 24 rule checker, and task selection."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fot.errors import InvalidRequestError
from fot.tasks import Game24Task, MathTask, Step, Task, detect_task, get_task, majority_key
from fot.tasks.game24 import (
    apply_step,
    check_expression,
    correct_step,
    parse_numbers,
    parse_step,
    solvable,
    solve,
    solve_last,
)
from fot.tasks.math import canonical_answer

F = Fraction
MATH = MathTask()
G24 = Game24Task()


# --- math: extraction -------------------------------------------------------------------------------------------

EXTRACT_CASES = [
    (r"So the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"nested \boxed{\frac{\sqrt{2}}{\left(2\right)}} done", r"\frac{\sqrt{2}}{\left(2\right)}"),
    (r"first \boxed{3} then corrected: \boxed{4}", "4"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{\$18.00}", "18"),
    (r"\boxed{30^\circ}", "30"),
    (r"\boxed{\text{Tuesday}}", "Tuesday"),
    ("It costs $1,234.50 in total", "1234.5"),
    ("The answer is 18 dollars.", "18"),
    ("So 3 + 4 = 7. I finish with 'The answer is X.'", "7"),  # the prompt's placeholder echoed back is no answer
    ("The answer is $18.00 per week.", "18"),
    ("THE ANSWER IS 5. Earlier I said the answer is 4.", "4"),
    ("the final answer is: $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("**Answer:** 42", "42"),
    ("3 * 7 = 21 and 21 + 4 = 25. The answer is \\(\\boxed", "25"),  # a box cut off by the token limit
    ("She pays 12 dollars.\nThe answer is \\[", "12"),
    ("The answer is that she has 5 apples left over after lunch.", "5"),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The temperature drops to -5 degrees", "-5"),
    ("She had 3 apples, bought 5 more and now has 8", "8"),
    ("10-5", "5"),
    ("x is 3/4.", "3/4"),
    ("The result is 0.50", "0.5"),
    ("We get 1,234,567 people", "1234567"),
    ("The answer is 4.5 million.", "4500000"),  # a scale word multiplies; it is no unit to drop
    ("The answer is 1.5 billion dollars.", "1500000000"),
    ("The answer is $\\frac{3}{4}$ of the pizza.", "3/4"),  # was 4, the denominator
    ("The answer is 3 dozen eggs.", "3"),  # a dozen may be what was asked for
    ("The answer is about 15.", "15"),  # a hedge and a worded aside are no part of the answer (were kept whole)
    ("The answer is approximately $33.33.", "33.33"),
    ("The answer is 15 (dollars).", "15"),
    ("The answer is 42 (rounded).", "42"),
    ("The answer is 2 (x+1).", "2 (x+1)"),  # an expression in brackets is no aside
    ("The answer is 2 pi.", "2 pi"),  # pi, i, e and sqrt are no units (it was 2)
    ("The answer is 3 (sin x).", "3 (sin x)"),  # a factor in brackets is no aside
    ("The answer is 2**10.", "2^10"),  # Python's power: it read 210, as if the ** were Markdown's bold
    ("**The answer is 15** dollars.", "15"),  # Markdown's bold, around or half cut off
    ("**The answer is 5.**", "5"),
    ("The answer is approximately $\\frac{1}{3}$.", "\\frac{1}{3}"),
    ("The answer is " + "9" * 4296 + " trillion.", "9" * 4296),  # too long to multiply out: kept, no error
    ("no numbers at all", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_math_extract(text: str, expected: str | None) -> None:
    assert MATH.extract(text) == expected


def test_canonical_answer_is_idempotent() -> None:
    for _, expected in EXTRACT_CASES:
        if expected is not None:
            assert canonical_answer(expected) == expected


# --- math: equivalence ------------------------------------------------------------------------------------------

EQUIVALENT_CASES = [
    ("0.5", "1/2", True),
    ("1/2", r"\frac{1}{2}", True),
    ("0.5", r"\frac{1}{2}", True),
    ("18", "18.00", True),
    ("1,000", "1000", True),
    ("-3/4", "-0.75", True),
    ("0.3333333", "1/3", True),  # relative tolerance 1e-6
    ("1000001", "1000000", False),  # a whole number is exact
    ("25000019.5", "25000000", False),
    ("14.999999999999998", "15", True),  # unless the other shows a float's rounding noise
    ("2**10", "1024", True),
    ("x^3+3x^2+3x+1", "x^3 + 3x^2 + 3x + 1", True),  # two powers are no power tower: math-verify compares them
    (r"2^{4} \cdot 3^{2}", "144", True),
    ("(x+1)^3", "x^3+3x^2+3x+1", True),
    ("0.333", "1/3", False),
    (r"\sqrt{4}", "2", True),  # math-verify
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    ("x^2+1", "1+x^2", True),
    ("3", "4", False),
    (r"\sqrt{2}", "2", False),
    ("", "", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), EQUIVALENT_CASES)
def test_math_equivalent(a: str, b: str, expected: bool) -> None:
    assert MATH.equivalent(a, b) is expected
    assert MATH.equivalent(b, a) is expected


def test_math_verify_works_from_worker_threads() -> None:
    """The search calls tasks from worker threads, where math-verify's signal-based timeout would raise."""
    pairs = [(r"\sqrt{4}", "2"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), (r"\sqrt{3}", r"\sqrt{5}")] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: MATH.equivalent(*p), pairs))
    assert results == [True, True, False] * 4


def test_math_parse_and_check() -> None:
    assert MATH.parse("  What is 2 + 2?  ") == "What is 2 + 2?"
    for bad in ["", "   ", None, 42]:
        with pytest.raises(InvalidRequestError):
            MATH.parse(bad)  # type: ignore[arg-type]
    assert MATH.check("2+2?", "2 + 2 = 4, so the answer is 4.") == []
    assert MATH.check("2+2?", "I do not know.") == ["no final answer"]


def test_majority_key() -> None:
    answers = ["18", "18.00", None, "3", "1/2", "0.5", "3", r"\frac{1}{2}", None]
    assert majority_key(MATH, answers) == [("1/2", 3), ("18", 2), ("3", 2)]
    assert majority_key(MATH, [None, None]) == []
    assert majority_key(G24, ["(4 + 6) * 2", "2 * (6 + 4)", "4*6"]) == [("(4 + 6) * 2", 2), ("4*6", 1)]


# --- Game of 24: puzzles and steps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem", ["4 6 1 10", "4, 6, 1, 10", "[4, 6, 1, 10]", " 4\t6\n1 10 ", "Use 4 6 1 10 to make 24", "4-6-1-10"]
)
def test_parse_numbers(problem: str) -> None:
    assert parse_numbers(problem) == (4, 6, 1, 10)
    assert G24.parse(problem) == "4 6 1 10"


@pytest.mark.parametrize("problem", ["4 6 1", "4 6 1 10 3", "no numbers here", "", "   ", "4 6 1 0", "4 6 1 1001"])
def test_parse_numbers_rejects(problem: str) -> None:
    with pytest.raises(InvalidRequestError, match="four numbers"):
        parse_numbers(problem)


@pytest.mark.parametrize("problem", ["4.5 6 1 10", "-4 6 1 10"])
def test_parse_numbers_rejects_non_positive_integers(problem: str) -> None:
    with pytest.raises(InvalidRequestError):
        G24.parse(problem)


def test_parse_numbers_rejects_non_strings() -> None:
    with pytest.raises(InvalidRequestError):
        parse_numbers(None)  # type: ignore[arg-type]


def test_parse_step_variants() -> None:
    assert parse_step("4 + 6 = 10 (left: 1 10 4)") == Step(F(4), "+", F(6), F(10), (F(1), F(10), F(4)))
    assert parse_step("Step 2: 4 x 6 = 24 (left: 24)") == Step(F(4), "*", F(6), F(24), (F(24),))
    assert parse_step("3 × 8 = 24") == Step(F(3), "*", F(8), F(24), None)
    assert parse_step("1/3 ÷ 2 = 1/6 (left: 1/6 5)") == Step(F(1, 3), "/", F(2), F(1, 6), (F(1, 6), F(5)))
    assert parse_step("8/4=2") == Step(F(8), "/", F(4), F(2), None)
    assert parse_step("4 − 6 = −2 (left: -2 1 10)") == Step(F(4), "-", F(6), F(-2), (F(-2), F(1), F(10)))
    assert parse_step("1. 10 - 4 = 6.") == Step(F(10), "-", F(4), F(6), None)
    assert parse_step("10 - 4 = 6, so 3 numbers are left") == Step(F(10), "-", F(4), F(6), None)
    assert parse_step("10 - 4 = 6 left: 1 6 6") == Step(F(10), "-", F(4), F(6), (F(1), F(6), F(6)))
    assert parse_step("10 - 4 = 6 (left 1 6 6)") == Step(F(10), "-", F(4), F(6), (F(1), F(6), F(6)))
    for not_a_step in ["Answer: 4 * 6 = 24", "(1 + 1) * 2 * 6 = 24", "left: 3 4", "hello", "4 + 6 = 10 + 0"]:
        assert parse_step(not_a_step) is None, not_a_step


STATE = (F(4), F(6), F(1), F(10))


def test_apply_step_valid() -> None:
    step = parse_step("4 + 6 = 10 (left: 1 10 10)")
    assert step is not None
    new, errors = apply_step(STATE, step)
    assert errors == []
    assert sorted(new or ()) == [F(1), F(10), F(10)]


def test_apply_step_wrong_result() -> None:
    step = parse_step("4 + 6 = 11 (left: 1 10 11)")
    assert step is not None
    new, errors = apply_step(STATE, step)
    assert sorted(new or ()) == [F(1), F(10), F(10)]  # the TRUE state, not the claimed one
    assert any("= 10, not 11" in e for e in errors)
    assert any("left should be 1 10 10" in e for e in errors)
    assert correct_step(STATE, step) == "4 + 6 = 10 (left: 1 10 10)"


def test_apply_step_wrong_left() -> None:
    step = parse_step("4 * 6 = 24 (left: 24 1 4)")
    assert step is not None
    new, errors = apply_step(STATE, step)
    assert sorted(new or ()) == [F(1), F(10), F(24)]
    assert errors == ["numbers left should be 1 10 24, not 1 4 24"]
    assert correct_step(STATE, step) == "4 * 6 = 24 (left: 1 10 24)"


def test_apply_step_left_is_order_insensitive() -> None:
    step = parse_step("10 - 1 = 9 (left: 6 9 4)")
    assert step is not None
    assert apply_step(STATE, step)[1] == []


def test_apply_step_operand_not_available() -> None:
    for line in ["7 + 1 = 8", "4 + 4 = 8", "6 * 6 = 36"]:
        step = parse_step(line)
        assert step is not None
        new, errors = apply_step(STATE, step)
        assert new is None and errors, line
        assert correct_step(STATE, step) is None
    step = parse_step("4 + 4 = 8")
    assert step is not None
    assert apply_step((F(4), F(4), F(6)), step)[1] == []  # a number that appears twice may be used twice


def test_apply_step_division_by_zero() -> None:
    state = (F(0), F(6), F(8))
    step = parse_step("6 / 0 = 0")
    assert step is not None
    new, errors = apply_step(state, step)
    assert new is None
    assert errors == ["division by zero: 6 / 0"]
    assert correct_step(state, step) is None


def test_apply_step_fractions() -> None:
    state = (F(8), F(3), F(1))
    step = parse_step("1 / 3 = 0.33 (left: 8 0.33)")
    assert step is not None
    new, errors = apply_step(state, step)
    assert sorted(new or ()) == [F(1, 3), F(8)]
    assert "1 / 3 = 1/3, not 33/100" in errors
    assert correct_step(state, step) == "1 / 3 = 1/3 (left: 1/3 8)"
    assert solve_last(F(8), F(1, 3)) == "(8 / (1/3))"


def test_solve_known_puzzles() -> None:
    assert solve([4, 6, 1, 10]) == ["((10 * (4 - 1)) - 6)"]
    assert solvable([4, 6, 1, 10])
    assert solve([1, 1, 1, 1]) == [] and not solvable([1, 1, 1, 1])
    assert solvable([4, 4, 6, 8]) and solve([4, 4, 6, 8])
    assert solvable([1, 5, 5, 5])  # only with a fraction: 5 * (5 - 1/5)
    assert "(5 * (5 - (1 / 5)))" in solve([1, 5, 5, 5])
    assert solvable([3, 3, 8, 8])  # 8 / (3 - 8/3)


def test_solve_last() -> None:
    assert solve_last(4, 6) == "(4 * 6)"
    assert solve_last(30, 6) == "(30 - 6)"
    assert solve_last(48, 2) == "(48 / 2)"
    assert solve_last(1, 1) is None


# --- Game of 24: full answers -----------------------------------------------------------------------------------

VALID = """4 + 8 = 12 (left: 4 6 12)
6 - 4 = 2 (left: 2 12)
2 * 12 = 24 (left: 24)
Answer: (6 - 4) * (4 + 8) = 24"""


def test_game24_extract() -> None:
    assert G24.extract(VALID) == "(6 - 4) * (4 + 8)"
    assert G24.extract("answer: 4 × 6 ÷ 1 = 24.") == "4 * 6 / 1"
    assert G24.extract("first Answer: 1+1\nthen ANSWER: (10 - 4) * 4") == "(10 - 4) * 4"
    assert G24.extract("4 + 6 = 10") is None


def test_game24_equivalent() -> None:
    assert G24.equivalent("(6-4)*(4+8)", "(6 - 4) * (4 + 8)")
    assert G24.equivalent("(6 - 4) * (4 + 8)", "(8 + 4) * (6 - 4)")
    assert not G24.equivalent("(6 - 4) * (4 + 8)", "4 * 6 * (8 - 4)")  # different numbers
    assert not G24.equivalent("4 + 4", "4 * 2")


def test_game24_check() -> None:
    assert G24.check("4 4 6 8", VALID) == []
    wrong = VALID.replace("4 + 8 = 12 (left: 4 6 12)", "4 + 8 = 13 (left: 4 6 13)")
    errors = G24.check("4 4 6 8", wrong)
    assert errors[:2] == ["line 1: 4 + 8 = 12, not 13", "line 1: numbers left should be 4 6 12, not 4 6 13"]
    assert len(errors) == 2  # the later steps are checked against the TRUE state, so they pass
    assert G24.check("4 4 6 8", "4 + 8 = 12 (left: 4 6 12)") == ["no answer"]
    assert G24.check("4 4 6 8", "Answer: 4 * 6 = 24") == ["answer does not use each number once and equal 24"]
    errors = G24.check("4 4 6 8", "9 + 4 = 13 (left: 4 6 8 13)\nAnswer: (6 - 4) * (4 + 8)")
    assert len(errors) == 1 and errors[0].startswith("line 1: 9 is not available")
    with pytest.raises(InvalidRequestError):
        G24.check("4 4 6", VALID)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "4 ** 2 + 6 + 2",
        "(4 // 1) * 6 * 1",
        "-4 + 6 * 1 * 10",
        "+4 * 6 * 1 * 1",
        "4 * 6 * 1.0 * 1",
        "4 * 6 * (1 - 1) = 0",
        "4 6 1 10",
        "",
        "(" * 500 + "4" + ")" * 500,
    ],
)
def test_check_expression_rejects(expr: str) -> None:
    assert check_expression([4, 6, 1, 1], expr) is False


def test_check_expression_accepts() -> None:
    assert check_expression([4, 6, 1, 1], "4 * 6 * 1 * 1")
    assert check_expression([4, 6, 1, 1], "4 x 6 ÷ 1 × 1 = 24")
    assert check_expression([8, 3, 8, 3], "8 / (3 - 8 / 3)")
    assert not check_expression([4, 6, 1, 10], "4 * 6 * 1")  # 10 unused
    assert not check_expression([4, 6, 1, 10], "4 * 6 / (10 - 10)")  # division by zero, 1 unused


# --- Game of 24: property tests ---------------------------------------------------------------------------------

Tree = int | tuple[str, "Tree", "Tree"]
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
SPELLINGS = {"+": ["+"], "-": ["-", "−"], "*": ["*", "x", "×"], "/": ["/", "÷"]}
numbers4 = st.lists(st.integers(1, 13), min_size=4, max_size=4)
# Few draws per example (hypothesis draws dominate the cost): operators, split points, and a seed for cosmetics.
shapes = st.tuples(
    st.lists(st.sampled_from("+-*/"), min_size=3, max_size=3),
    st.lists(st.integers(0, 2), min_size=3, max_size=3),
    st.integers(0, 2**32 - 1),
)


def build(leaves: list[int], ops: list[str], splits: list[int]) -> Tree:
    """A full binary expression tree over `leaves` in order; ops and split points are consumed as needed."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 + splits.pop() % (len(leaves) - 1)
    op = ops.pop()
    return (op, build(leaves[:k], ops, splits), build(leaves[k:], ops, splits))


def value(tree: Tree) -> Fraction | None:
    """Exact value computed independently of the code under test; None on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = value(left), value(right)
    if a is None or b is None or (op == "/" and b == 0):
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b if op == "*" else a / b


def leaves(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else leaves(tree[1]) + leaves(tree[2])


def render(tree: Tree, rng: random.Random, full: bool) -> str:
    """Fully parenthesised, or with only the parentheses precedence needs; random operator spellings and spaces."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ls, rs = render(left, rng, full), render(right, rng, full)
    if not isinstance(left, int) and (full or PRECEDENCE[left[0]] < PRECEDENCE[op]):
        ls = f"({ls})"
    if not isinstance(right, int) and (
        full or PRECEDENCE[right[0]] < PRECEDENCE[op] or (PRECEDENCE[right[0]] == PRECEDENCE[op] and op in "-/")
    ):
        rs = f"({rs})"
    space = rng.choice(["", " ", "  "])
    return f"{ls}{space}{rng.choice(SPELLINGS[op])}{space}{rs}"


def replace_leaf(tree: Tree, index: int, new: int) -> tuple[Tree, int]:
    """The tree with its index-th leaf (left to right) replaced; returns how many leaves were passed."""
    if isinstance(tree, int):
        return (new if index == 0 else tree), 1
    op, left, right = tree
    new_left, n = replace_leaf(left, index, new)
    new_right, m = replace_leaf(right, index - n, new)
    return (op, new_left, new_right), n + m


@settings(max_examples=300, deadline=None)
@given(numbers4, st.randoms(use_true_random=False), shapes)
def test_check_expression_matches_exact_value(
    nums: list[int], rng: random.Random, shape: tuple[list[str], list[int], int]
) -> None:
    ops, splits, seed = shape
    perm = random.Random(seed).sample(nums, 4)
    tree = build(perm, list(ops), list(splits))
    text = render(tree, rng, full=rng.random() < 0.5) + rng.choice(["", " = 24", "=24"])
    expected = value(tree) == 24
    assert check_expression(nums, text) is expected, text
    if expected:
        assert solvable(nums)


def completions(v: Fraction) -> list[tuple[str, bool, int]]:
    """(op, number first?, n) with a whole n in 1..1000 (a puzzle's range) such that `v op n` or `n op v` is 24."""
    wanted = [("+", False, 24 - v), ("-", False, v - 24), ("*", False, 24 / v if v else None)]
    wanted += [("/", False, v / 24), ("-", True, 24 + v), ("/", True, 24 * v)]
    return [(op, first, int(n)) for op, first, n in wanted if n is not None and n.denominator == 1 and 1 <= n <= 1000]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 13), min_size=3, max_size=3), st.randoms(use_true_random=False), shapes)
def test_check_expression_accepts_solutions(
    three: list[int], rng: random.Random, shape: tuple[list[str], list[int], int]
) -> None:
    """Random trees rarely make 24, so build ones that do: a tree over three numbers completed by a fourth."""
    ops, splits, _ = shape
    sub = build(three, list(ops), list(splits))
    v = value(sub)
    options = completions(v) if v is not None else []
    assume(options)
    op, first, n = rng.choice(options)
    tree: Tree = (op, n, sub) if first else (op, sub, n)
    assert value(tree) == 24
    nums = rng.sample([*three, n], 4)
    text = render(tree, rng, full=rng.random() < 0.5) + rng.choice(["", " = 24"])
    assert check_expression(nums, text), text
    assert solvable(nums)
    assert G24.check(" ".join(map(str, nums)), f"Answer: {text}") == []


@settings(max_examples=300, deadline=None)
@given(numbers4, st.randoms(use_true_random=False), shapes, st.integers(0, 3), st.integers(1, 12))
def test_check_expression_rejects_other_numbers(
    nums: list[int], rng: random.Random, shape: tuple[list[str], list[int], int], index: int, shift: int
) -> None:
    ops, splits, seed = shape
    perm = random.Random(seed).sample(nums, 4)
    tree = build(perm, list(ops), list(splits))
    full = rng.random() < 0.5
    other = (perm[index] - 1 + shift) % 13 + 1  # a different number in 1..13
    replaced, _ = replace_leaf(tree, index, other)
    assert sorted(leaves(replaced)) != sorted(nums)
    assert check_expression(nums, render(replaced, rng, full)) is False
    extra = f"({render(tree, rng, full)}) {rng.choice('+-*/')} {rng.randint(0, 13)}"
    assert check_expression(nums, extra) is False
    missing = build(perm[:3], list(ops), list(splits))
    assert check_expression(nums, render(missing, rng, full)) is False


@settings(max_examples=300, deadline=None)
@given(numbers4)
def test_every_solution_checks(nums: list[int]) -> None:
    solutions = solve(nums)
    assert solvable(nums) is bool(solutions)
    for expr in solutions:
        assert check_expression(nums, expr), expr
    if solutions:
        assert G24.check(" ".join(map(str, nums)), f"Answer: {solutions[0]} = 24") == []


# --- task selection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("4 6 1 10", "game24"),
        ("[4, 6, 1, 10]", "game24"),
        ("(4; 6; 1; 10).", "game24"),
        ("  4,6,1,10\n", "game24"),
        ("1234", "math"),
        ("What is 4 + 6 + 1 + 10?", "math"),
        ("Janet has 4 ducks, 6 hens, 1 cow and 10 goats. How many animals?", "math"),
    ],
)
def test_detect_task(problem: str, expected: str) -> None:
    assert detect_task(problem) == expected


@pytest.mark.parametrize("bad", ["", "  \n", None, 7])
def test_detect_task_rejects(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        detect_task(bad)  # type: ignore[arg-type]


def test_get_task() -> None:
    assert isinstance(get_task("math"), MathTask) and get_task("math").name == "math"
    assert isinstance(get_task("game24"), Game24Task) and get_task(" Game24 ").name == "game24"
    assert isinstance(get_task("math"), Task)
    for bad in ["chess", "", None]:
        with pytest.raises(InvalidRequestError, match="known tasks: game24, math"):
            get_task(bad)  # type: ignore[arg-type]
