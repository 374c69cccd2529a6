"""Game of 24: reach 24 from four numbers with + - * /, each number used once. Exact (Fraction) arithmetic only.

Besides parsing and comparing answers, this module holds the rule checker the search uses for self-correction:
every step line ("4 + 6 = 10 (left: 1 4 10)") is recomputed and its remaining numbers are checked.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from fot.errors import InvalidRequestError

TARGET = Fraction(24)
MAX_NUMBER = 1000

# Integer tokens of a puzzle; a '-' right after a digit is a separator ("4-6-1-10"), elsewhere a sign.
_TOKEN = re.compile(r"(?:(?<![\d)])-)?\d+(?:\.\d+)?")
_GOAL = re.compile(r"\b(?:make|makes|get|gets|reach|obtain|equal|equals|to)\s+24\b|=\s*24\b|\bgame\s+of\s+24\b", re.I)
_NUM = r"-?\d+(?:\.\d+)?(?:/\d+)?"
_OP = r"[-+*/xX×÷·∗]"
_STEP = re.compile(
    rf"^\s*(?:[^:=()]*:\s*|\d+[.)]\s+|[-*•]\s+)?"  # "Step 1:", "1.", "- " prefixes
    rf"\(?\s*(?P<a>{_NUM})\s*(?P<op>{_OP})\s*(?P<b>{_NUM})\s*\)?\s*=\s*(?P<r>{_NUM})"
    rf"(?!\s*{_OP}\s*\d)(?!\d|\.\d)"
)
_LEFT = re.compile(r"(?:\(\s*left\b\s*:?|\bleft\s*:)\s*([^)\n]*)", re.I)  # "(left: 1 4)", "left: 1 4"
_ANSWER = re.compile(r"answer\s*:", re.I)
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "X": "*", "×": "*", "·": "*", "∗": "*", "÷": "/"}
_EXPR_CHARS = re.compile(r"[\d+\-*/()\s]+")
_MAX_EXPR_CHARS = 300  # four numbers never need more; bounds the recursion over the tree


def _normalise(text: str) -> str:
    """One spelling of minus signs (unicode minus and dashes become '-')."""
    return text.replace("−", "-").replace("–", "-").replace("—", "-")


def fmt(x: Fraction) -> str:
    """'10' for an integral value, else 'p/q'."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _operand(x: Fraction) -> str:
    """A number as an operand of an expression: fractions in parentheses, so '8 / (1/3)' keeps its meaning."""
    return fmt(x) if x.denominator == 1 and x >= 0 else f"({fmt(x)})"


def parse_numbers(problem: str) -> tuple[int, ...]:
    """The four numbers of a puzzle: '4 6 1 10', '4, 6, 1, 10', '[4, 6, 1, 10]', 'Use 4 6 1 10 to make 24'."""
    if not isinstance(problem, str):
        raise InvalidRequestError(f"a Game of 24 puzzle must be a string, got {type(problem).__name__}")
    text = problem.strip()
    tokens = _TOKEN.findall(_GOAL.sub(" ", _normalise(text)))
    try:
        numbers = tuple(int(t) for t in tokens)
    except ValueError:
        numbers = ()
    if len(numbers) != 4 or not all(1 <= n <= MAX_NUMBER for n in numbers):
        raise InvalidRequestError(
            f"a Game of 24 puzzle is four numbers, got {text!r} "
            f"(each a whole number from 1 to {MAX_NUMBER}, e.g. '4 6 1 10')"
        )
    return numbers


@dataclass(frozen=True)
class Step:
    """One step as the text CLAIMS it: a op b = result, with the numbers left (None when the line gives none).

    `op` is one of '+', '-', '*', '/' whatever the text wrote ('x', '×', '÷', '−').
    """

    a: Fraction
    op: str
    b: Fraction
    result: Fraction
    left: tuple[Fraction, ...] | None


def parse_step(line: str) -> Step | None:
    """A step line such as '4 + 6 = 10 (left: 1 10 4)', or None when the line is not a step (or is the answer)."""
    if not isinstance(line, str) or _ANSWER.search(line):
        return None
    line = _normalise(line)
    match = _STEP.search(line)
    if match is None:
        return None
    try:
        a, b, result = (Fraction(match.group(k)) for k in ("a", "b", "r"))
    except (ValueError, ZeroDivisionError):  # '1/0' as a number
        return None
    left = None
    rest = _LEFT.search(line, match.end())
    if rest:
        try:
            left = tuple(Fraction(t) for t in re.findall(_NUM, rest.group(1)))
        except (ValueError, ZeroDivisionError):
            left = None
    return Step(a=a, op=_OPS[match.group("op")], b=b, result=result, left=left)


def _compute(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def _list(xs: Sequence[Fraction]) -> str:
    return " ".join(fmt(x) for x in sorted(xs))


def apply_step(state: tuple[Fraction, ...], step: Step) -> tuple[tuple[Fraction, ...] | None, list[str]]:
    """Check one step against the numbers available; return the TRUE next state (None if impossible) and errors.

    The next state is the remaining numbers minus both operands plus the exactly recomputed result, whatever the
    text claimed, so a search can continue from a step with a wrong sum.
    """
    errors: list[str] = []
    remaining = list(state)
    missing = False
    for operand in (step.a, step.b):
        if operand in remaining:
            remaining.remove(operand)
        else:
            missing = True
            uses = "used twice but available once" if operand == step.a == step.b and operand in state else None
            errors.append(f"{fmt(operand)} is {uses or 'not available'} (numbers left: {_list(state)})")
    exact = _compute(step.a, step.op, step.b)
    if exact is None:
        errors.append(f"division by zero: {fmt(step.a)} / {fmt(step.b)}")
    if missing or exact is None:
        return None, errors
    if step.result != exact:
        errors.append(f"{fmt(step.a)} {step.op} {fmt(step.b)} = {fmt(exact)}, not {fmt(step.result)}")
    new_state = (*remaining, exact)
    if step.left is not None and Counter(step.left) != Counter(new_state):
        errors.append(f"numbers left should be {_list(new_state)}, not {_list(step.left)}")
    return new_state, errors


def correct_step(state: tuple[Fraction, ...], step: Step) -> str | None:
    """The step line with the recomputed result and the true numbers left; None when the operands are unusable."""
    new_state, _ = apply_step(state, step)
    if new_state is None:
        return None
    exact = new_state[-1]
    return f"{fmt(step.a)} {step.op} {fmt(step.b)} = {fmt(exact)} (left: {_list(new_state)})"


def _parse_expression(expr: str) -> ast.expr | None:
    """The syntax tree of an arithmetic expression of non-negative integers, + - * / and parentheses, or None."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        return None
    text = _normalise(expr).strip().rstrip(".").strip()
    text = re.sub(r"=\s*24\s*$", "", text)
    text = "".join(_OPS.get(c, c) for c in text)
    if not text.strip() or not _EXPR_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return tree.body if _allowed(tree.body) else None


def _allowed(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp):
        return (
            isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div) and _allowed(node.left) and _allowed(node.right)
        )
    return isinstance(node, ast.Constant) and type(node.value) is int


def _leaves(node: ast.expr) -> Iterator[int]:
    if isinstance(node, ast.BinOp):
        yield from _leaves(node.left)
        yield from _leaves(node.right)
    else:
        yield node.value  # type: ignore[attr-defined]


def _evaluate(node: ast.expr) -> Fraction | None:
    """Exact value of an allowed tree; None on division by zero."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)  # type: ignore[attr-defined]
    if left is None or right is None:
        return None
    op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]  # type: ignore[attr-defined]
    return _compute(left, op, right)


def check_expression(numbers: Sequence[int | Fraction], expr: str) -> bool:
    """True iff `expr` uses exactly the multiset `numbers` (each once) and equals 24 exactly. Never evaluates code."""
    tree = _parse_expression(expr)
    if tree is None:
        return False
    if Counter(Fraction(n) for n in _leaves(tree)) != Counter(Fraction(n) for n in numbers):
        return False
    return _evaluate(tree) == TARGET


_Node = str | tuple[str, "_Node", "_Node"]


def _render(node: _Node) -> str:
    return node if isinstance(node, str) else f"({_render(node[1])} {node[0]} {_render(node[2])})"


def _combine(x: tuple[Fraction, _Node], y: tuple[Fraction, _Node]) -> Iterator[tuple[Fraction, _Node]]:
    """Every value of x op y and y op x (one order for + and *); expressions stay trees until a solution is found."""
    (a, ea), (b, eb) = x, y
    yield a + b, ("+", ea, eb)
    yield a * b, ("*", ea, eb)
    yield a - b, ("-", ea, eb)
    yield b - a, ("-", eb, ea)
    if b != 0:
        yield a / b, ("/", ea, eb)
    if a != 0:
        yield b / a, ("/", eb, ea)


def _last(x: tuple[Fraction, _Node], y: tuple[Fraction, _Node]) -> Iterator[_Node]:
    """The combinations of the last two numbers that make 24, same order as _combine; exact integer
    cross-multiplication on numerators and (positive) denominators, which is most of the search's work."""
    (a, ea), (b, eb) = x, y
    p, q, r, s = a.numerator, a.denominator, b.numerator, b.denominator
    if p * s + r * q == 24 * q * s:
        yield ("+", ea, eb)
    if p * r == 24 * q * s:
        yield ("*", ea, eb)
    if p * s - r * q == 24 * q * s:
        yield ("-", ea, eb)
    if r * q - p * s == 24 * q * s:
        yield ("-", eb, ea)
    if r != 0 and p * s == 24 * q * r:
        yield ("/", ea, eb)
    if p != 0 and r * q == 24 * s * p:
        yield ("/", eb, ea)


def _search(items: list[tuple[Fraction, _Node]]) -> Iterator[str]:
    """Solutions found by combining any two numbers, depth first; lazy, so the first costs only its share."""
    if len(items) == 1:
        if items[0][0] == TARGET:
            yield _render(items[0][1])
        return
    if len(items) == 2:
        for node in _last(items[0], items[1]):
            yield _render(node)
        return
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
            for combined in _combine(items[i], items[j]):
                yield from _search([*rest, combined])


def _items(numbers: Sequence[int | Fraction]) -> list[tuple[Fraction, _Node]]:
    return [(Fraction(n), _operand(Fraction(n))) for n in numbers]


def solve(numbers: Sequence[int | Fraction]) -> list[str]:
    """Every distinct fully parenthesised solution, by exhaustive exact search (sorted, so results are stable)."""
    return sorted(set(_search(_items(numbers))))


def solvable(numbers: Sequence[int | Fraction]) -> bool:
    """Whether any solution exists (stops at the first)."""
    return next(_search(_items(numbers)), None) is not None


def join_last(x: tuple[Fraction, str], y: tuple[Fraction, str]) -> str | None:
    """The last step of a search: 'ex op ey' for the first op that makes the two values x and y 24 (each given with
    the expression it stands for), or None."""
    node = next(_last(x, y), None)
    return None if node is None else f"{_render(node[1])} {node[0]} {_render(node[2])}"


def solve_last(a: int | Fraction, b: int | Fraction) -> str | None:
    """For a final two-number state, an expression of a and b equal to 24, e.g. '(4 * 6)', or None."""
    a, b = Fraction(a), Fraction(b)
    expr = join_last((a, _operand(a)), (b, _operand(b)))
    return None if expr is None else f"({expr})"


class Game24Task:
    """Game of 24 puzzles; answers are expressions like '(10 - 4) * (1 + 3)'."""

    name = "game24"
    tree = "tot"  # a step is one arithmetic operation, each checked exactly
    checks = MappingProxyType({})  # its rule, exact recomputation of every step, is `check`, run by ToT per step

    def parse(self, problem: str) -> str:
        """The canonical 'a b c d' of a puzzle; InvalidRequestError unless it is four numbers."""
        return " ".join(str(n) for n in parse_numbers(problem))

    def extract(self, text: str) -> str | None:
        """The expression after the last 'Answer:', without a trailing '= 24'; None when there is none."""
        if not isinstance(text, str):
            return None
        matches = list(_ANSWER.finditer(text))
        if not matches:
            return None
        answer = text[matches[-1].end() :].split("\n", 1)[0]
        answer = _normalise(answer).replace("**", "").replace("$", "").replace("`", "").strip().rstrip(".").strip()
        answer = re.sub(r"\s*=\s*24\s*$", "", answer)
        answer = "".join(_OPS.get(c, c) if c in "×÷·∗" else c for c in answer)
        answer = re.sub(r"\s+", " ", answer).strip()
        return answer or None

    def equivalent(self, a: str, b: str) -> bool:
        """Same expression up to whitespace, or same exact value from the same multiset of numbers."""
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        if re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b):
            return True
        ta, tb = _parse_expression(a), _parse_expression(b)
        if ta is None or tb is None:
            return False
        if Counter(_leaves(ta)) != Counter(_leaves(tb)):
            return False
        va = _evaluate(ta)
        return va is not None and va == _evaluate(tb)

    def check(self, problem: str, text: str) -> list[str]:
        """Every step line recomputed in order from the puzzle's numbers, then the final answer checked."""
        numbers = parse_numbers(problem)
        if not isinstance(text, str):
            return ["no answer"]
        errors: list[str] = []
        state: tuple[Fraction, ...] = tuple(Fraction(n) for n in numbers)
        for number, line in enumerate(text.splitlines(), start=1):
            step = parse_step(line)
            if step is None:
                continue
            new_state, step_errors = apply_step(state, step)
            errors.extend(f"line {number}: {e}" for e in step_errors)
            if new_state is not None:
                state = new_state
        answer = self.extract(text)
        if answer is None:
            errors.append("no answer")
        elif not check_expression(numbers, answer):
            errors.append("answer does not use each number once and equal 24")
        return errors
