"""Rule checks of math answers: the rule-based kind of FoT's dynamic self-correction.

Each check reads an answer, recomputes what it can exactly, and at the first claim that is wrong returns a
`Failure` whose `prefix` is the answer up to that claim with the right value written in: the model continues from
there (one continuation request), so that what it concludes follows from the right numbers. A task names its
checks (`Task.checks`); math has two.

- `check_code`: models that write Python often make up what it prints (an `output` block whose numbers the code
  does not produce) and answer from those numbers. Each ```python block runs in the safe interpreter
  (fot.tasks.interpreter; never exec) and its real output is compared with the output block that follows it.
- `check_arithmetic`: the prose's own statements, `a op b = c` and chains such as `a + b + c = d` (× x * / ÷ ^,
  parentheses, $ and thousands separators, percentages, decimals, fractions, LaTeX's \\times \\div \\frac), are
  recomputed exactly (fractions, through the same interpreter). A claimed value rounded or cut to the digits it
  shows passes (10 / 4 = 2 is a floor, 2 / 3 = 0.67 a rounding); anything the parser is not sure is arithmetic
  (dates, times, phone numbers, "3-4 apples", algebra, labels such as "Step 1 - ...") is not checked at all.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from fot.tasks.interpreter import Limits, Run, run


@dataclass(frozen=True)
class Failure:
    """A claim that recomputing shows is wrong."""

    kind: str  # the check that found it: "code" or "arithmetic"
    source: str  # the code, or the statement's left side
    claimed: str
    actual: str
    at: int  # where the claim begins in the answer
    prefix: str  # the answer up to the claim, with the right value in its place
    rest: str  # what the answer wrote after the claim


@dataclass(frozen=True)
class Finding:
    """What checking one answer found: how many claims could be recomputed, and the first wrong one."""

    checked: int = 0
    failure: Failure | None = None
    skipped: int = 0  # claims not judged: code outside the whitelist, past a bound, an error, or printing nothing


class Check(Protocol):
    """A rule check: (problem, answer text) -> Finding. Pure and thread-safe."""

    def __call__(self, problem: str, text: str) -> Finding: ...


# ---- code ---------------------------------------------------------------------------------------------------------
CODE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S | re.I)
# the block after the code that holds what it "printed": ```output, ```text or a bare fence, maybe after a short
# line such as "Output:" or "When you run this code, the output is:"
CLAIMED = re.compile(
    r"[ \t]*\n?(?:[^\n`]{0,100}\n)?[ \t]*```(?:output|text|plaintext|console)?[ \t]*\n(.*?)```", re.S | re.I
)
ANSWER_STEPS = 4 * Limits.max_steps  # one answer's code blocks together: many blocks do not each get a full bound
TOKEN = re.compile(r"-?\d+/\d+(?!\d|\.\d)|-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+-]?\d+)?|[^\W\d]+|\S")


def check_code(problem: str, text: str) -> Finding:
    checked = skipped = 0
    steps = ANSWER_STEPS
    for m in CODE.finditer(text):
        claimed = CLAIMED.match(text, m.end())
        if claimed is None:
            continue  # nothing claimed about this block: nothing to compare
        result: Run = run(m.group(1), Limits(max_steps=min(Limits.max_steps, steps)))
        steps -= result.steps
        if not result.ok or not result.output.strip():
            skipped += 1  # not checkable, stopped by a bound, an error, or it prints nothing: counted, not judged
            continue
        checked += 1
        if not same_output(claimed.group(1), result.output):
            prefix = text[: claimed.start(1)] + result.output.rstrip("\n") + "\n```\n"
            rest = text[claimed.end() :]
            failure = Failure(
                "code", m.group(1), claimed.group(1).strip(), result.output.strip(), claimed.start(1), prefix, rest
            )
            return Finding(checked, failure, skipped)
    return Finding(checked, skipped=skipped)


def same_output(claimed: str, actual: str) -> bool:
    """Whether a claimed output says what the real one says: the same words, whole values equal, other numbers
    equal to 1e-6 relative (a claimed "10" for a printed "10.0", or "6.43" for "6.428571428571429", rounded as
    claimed, is the same)."""
    a, b = TOKEN.findall(claimed), TOKEN.findall(actual)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        ex, ey = exact(x), exact(y)
        nx, ny = finite(ex), finite(ey)
        if ex is not None and ey is not None and whole(ex) and whole(ey):  # no rounding noise to allow for
            if ex != ey:
                return False
        elif nx is not None and ny is not None:
            decimals = len(x.partition(".")[2]) if "e" not in x.lower() else 0
            rounded = "." in x and math.isclose(round(ny, decimals), nx, rel_tol=1e-12, abs_tol=1e-12)
            if not rounded and not math.isclose(nx, ny, rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def exact(token: str) -> Decimal | Fraction | None:
    """A numeral's exact value (any length: Decimal has no digit limit), or None."""
    try:
        return Fraction(token) if "/" in token else Decimal(token.replace(",", ""))
    except (ValueError, ZeroDivisionError, ArithmeticError):
        return None


def whole(v: Decimal | Fraction) -> bool:
    return v.denominator == 1 if isinstance(v, Fraction) else v.is_finite() and v == v.to_integral_value()


def finite(v: Decimal | Fraction | None) -> float | None:
    """An exact value as a float, or None where it has none (nan, inf, past a float's range)."""
    try:
        f = float(v) if v is not None else math.nan
    except OverflowError:  # a Fraction past a float's range
        return None
    return f if math.isfinite(f) else None


def number(token: str) -> float | None:
    """A numeral's value, or None: the words nan and inf, which float() reads, are words here."""
    return finite(exact(token))


def last_number(text: str) -> str | None:
    """The last number in a text, as written (thousands separators dropped)."""
    found = [t for t in TOKEN.findall(text) if number(t) is not None]
    return found[-1].replace(",", "") if found else None


# ---- arithmetic in prose ------------------------------------------------------------------------------------------
_LEX = re.compile(
    r"(?P<frac>\\[dt]?frac\s*\{\s*(?P<fn>\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<fd>\d+(?:\.\d+)?)\s*\})"
    r"|(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?P<pct>\s?\\?%)?"
    r"|(?P<op>\*\*|\\times|\\cdot|\\div|[-+*/^×÷·])"
    r"|(?P<eq>(?<![=<>!:])=(?![=>]))"
    r"|(?P<open>\()|(?P<close>\))|(?P<cur>\\?\$|[€£])|(?P<boxed>\\boxed\s*\{)"
    r"|(?P<word>[A-Za-z]+)|(?P<space>[ \t]+)|(?P<other>[\s\S])"
)
_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_PYTHON_OP = {"×": "*", "\\times": "*", "\\cdot": "*", "·": "*", "x": "*", "times": "*", "÷": "/", "\\div": "/",
              "^": "**", "plus": "+", "minus": "-"}  # fmt: skip
_OP_WORDS = {"x", "times", "plus", "minus"}  # words that stand between two numbers as an operator
# after a number, these make it something other than that number (a scale, an ordinal, a power)
_NOT_PLAIN = {"hundred", "thousand", "million", "billion", "trillion", "dozen", "dozens", "half", "halves", "quarter",
              "quarters", "third", "thirds", "k", "m", "bn", "squared", "cubed", "percent", "st", "nd", "rd", "th",
              "x"}  # fmt: skip
# words that end a run of arithmetic (read backwards from `=`), never taken as units
_STOP = {"and", "or", "to", "of", "by", "is", "are", "was", "were", "for", "per", "each", "from", "in", "on", "at",
         "the", "a", "an", "so", "then", "than", "that", "which", "gives", "makes", "equals", "we", "get", "with",
         "if", "as", "be", "divided", "multiplied"}  # fmt: skip
# a number right after one of these is a label, not an operand ("Step 1 - 3 + 4 = 7" is not 1 - 3 + 4)
_LABELS = {"step", "day", "week", "month", "year", "part", "case", "option", "method", "problem", "question", "line",
           "item", "no", "round", "stage", "phase", "page", "chapter", "level", "grade", "floor", "room"}  # fmt: skip
_GLUED = set(":.,/_'#@&\\")  # glued to the start of a run, these make it part of something else (2:30, v1.2)
_OPERANDS = ("num", "frac", "open", "cur")
_MINUS = str.maketrans({"\u2212": "-"})  # same length: positions kept (not the en dash: "ages 3–5" is a range)
_MAX_STATEMENTS = 100
_MAX_DIGITS = 30  # a longer number is no arithmetic claim (and past 4300 digits int() refuses it)
_MAX_VALUE = 10**15  # larger results are not judged: a claim that size is notation more often than arithmetic


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    start: int
    end: int
    python: str = ""  # the token as Python, for operands and operators
    pct: bool = False


@dataclass(frozen=True)
class _Claim:
    start: int  # of the claimed number, its sign included
    end: int
    text: str
    pct: bool
    chained: bool  # an operator follows: judged only where the claim agrees ("2 * 3 = 6 * 4 = 24": as 6)


def check_arithmetic(problem: str, text: str) -> Finding:
    checked, at = 0, 0
    spans = []
    for m in _FENCE.finditer(text):  # code blocks are the code check's; only prose is read here
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, len(text)))
    minus = text.translate(_MINUS)
    for lo, hi in spans:
        toks = [_token(m) for m in _LEX.finditer(minus, lo, hi)]
        for i in (i for i, t in enumerate(toks) if t.kind == "eq"):
            left, claim = _left(toks, i), _claim(toks, i)
            if left is None or claim is None or (claim.pct and not any(t.pct for t in left)):
                continue  # "0.25 * 100 = 25%" converts to a percentage: no claim about the value
            value = _evaluate(left)
            if value is None:
                continue
            scale = 100 if claim.pct else 1
            agrees = _agrees(Fraction(claim.text.replace(",", "")), value * scale, _decimals(claim.text))
            if claim.chained and not agrees:
                continue  # "2 + 3 = 10 - 5": the right side is an expression, not a claimed value
            checked += 1
            if not agrees:
                shown = _show(value * scale, claim.text)
                source = text[left[0].start : left[-1].end]
                prefix, rest = text[: claim.start] + shown, text[claim.end :]
                return Finding(checked, Failure("arithmetic", source, claim.text, shown, claim.start, prefix, rest))
            if checked >= _MAX_STATEMENTS:
                return Finding(checked)
    return Finding(checked)


def _token(m: re.Match) -> _Tok:
    kind = m.lastgroup if m.group("frac") is None and m.group("num") is None else ("frac" if m.group("frac") else "num")
    if kind == "num":
        value = f"Rational('{m.group('num').replace(',', '')}')"
        pct = m.group("pct") is not None
        end = m.start() + len(m.group("num"))
        return _Tok("num", m.group("num"), m.start(), m.end() if pct else end, f"({value}/100)" if pct else value, pct)
    if kind == "frac":
        return _Tok(
            "frac", m.group(0), m.start(), m.end(), f"(Rational('{m.group('fn')}')/Rational('{m.group('fd')}'))"
        )
    python = {"op": _PYTHON_OP.get(m.group(0), m.group(0)), "open": "(", "close": ")"}.get(kind, "")
    return _Tok(kind, m.group(0), m.start(), m.end(), python)


def _near(toks: list[_Tok], i: int, step: int) -> _Tok | None:
    """The nearest token from toks[i] on in direction `step` that is not a space."""
    while 0 <= i < len(toks):
        if toks[i].kind != "space":
            return toks[i]
        i += step
    return None


def _left(toks: list[_Tok], eq: int) -> list[_Tok] | None:
    """The arithmetic just before the `=` at toks[eq], as tokens whose `python` joins into the expression; units
    after numbers are kept with an empty `python`. None when it is not plainly arithmetic."""
    taken: list[tuple[int, _Tok]] = []  # (index, token), read backwards
    k = eq - 1
    while k >= 0:
        t = toks[k]
        if t.kind == "space":
            k -= 1
            continue
        before, after = _near(toks, k - 1, -1), taken[-1][1] if taken else None
        if t.kind == "word":
            w = t.text.lower()
            between = (
                before is not None and before.kind in ("num", "frac", "close") and after is not None
                and after.kind in _OPERANDS
            )  # fmt: skip
            if w in _OP_WORDS and between or w == "of" and between and before.pct:
                t = _Tok("op", t.text, t.start, t.end, _PYTHON_OP.get(w, "*"))
            elif (w in _NOT_PLAIN or len(w) == 1) and before is not None and before.kind in ("num", "frac"):
                return None  # a scale or a power ("3 hundred", "2 squared"), or a variable ("10n + 9", "2H")
            elif w in _STOP or before is None or not _after_number(toks, k):
                break
        elif t.kind not in ("num", "frac", "op", "open", "close", "cur"):
            break
        taken.append((k, t))
        k -= 1
    stop = _near(toks, k, -1)
    first = len(taken) - 1  # taken[first] is the run's first token
    depth = list(itertools.accumulate((u.kind == "open") - (u.kind == "close") for _, u in taken))
    while first >= 0 and taken[first][1].kind in ("op", "open"):
        t, nxt = taken[first][1], taken[first - 1][1] if first else None
        bold = t.text == "**" and (stop is None or stop.end < t.start)  # "**3 + 4 = 7**", not "x**3 + 4"
        dash = t.kind == "op" and (bold or t.python == "-" and nxt is not None and nxt.start > t.end)
        unclosed = t.kind == "open" and depth[first] > 0  # "(3 + 4 = 7)"
        if not (dash or unclosed):
            break
        first -= 1
    start = taken[first][0] if first >= 0 else eq
    run = [t for _, t in taken[first::-1]] if first >= 0 else []
    if run and run[0].kind == "op" and run[0].python != "-":
        return None  # "x * 3 + 2", "π × 5^2": the operator's left operand is no number
    if stop is not None and stop.kind == "other" and stop.text in "√∛∜π∑∏|":
        return None  # "√16 + 2"
    if not run or not any(t.kind == "op" for t in run[1:]) or run[-1].kind in ("op", "open", "cur"):
        return None
    units = {t.text.lower().removesuffix("s") for t in run if t.kind == "word"}
    if len(units) > 1 and any(t.python in ("+", "-") for t in run[1:]):
        return None  # "7 hours + 20 minutes": a sum of different units is no plain sum
    numbers = [t for t in run if t.kind == "num"]
    if any(t.pct for t in numbers) and not all(t.pct for t in numbers) and any(t.python in ("+", "-") for t in run[1:]):
        return None  # "$50 + 20%" means 50 * 1.2: not plainly arithmetic
    glued = toks[start - 1] if start > 0 else None
    if glued is not None and (glued.kind == "word" or glued.kind == "other" and glued.text in _GLUED):
        return None  # "x2 + 3", "2:30 + 45", "v1.2 + 1"
    if stop is not None and stop.kind == "word" and stop.text.lower() in _LABELS and run[0].kind == "num":
        return None
    return run


def _after_number(toks: list[_Tok], k: int) -> bool:
    """Whether the word at toks[k] is a unit: right after a number, or after one unit word that is ("5 sq ft")."""
    before = _near(toks, k - 1, -1)
    if before is not None and before.kind == "word" and before.text.lower() not in _STOP | _OP_WORDS:
        before = _near(toks, toks.index(before) - 1, -1)
    return before is not None and before.kind in ("num", "frac")


def _claim(toks: list[_Tok], eq: int) -> _Claim | None:
    """The number claimed right after the `=` at toks[eq] ($, bold and \\boxed{ skipped), or None."""
    k, sign = eq + 1, None
    while k < len(toks) and (toks[k].kind in ("space", "cur", "boxed") or toks[k].text == "**"):
        k += 1
    if k + 1 < len(toks) and toks[k].text == "-" and toks[k + 1].kind == "num" and toks[k + 1].start == toks[k].end:
        sign, k = toks[k], k + 1
    if k >= len(toks) or toks[k].kind != "num" or len(toks[k].text) > _MAX_DIGITS:
        return None
    t = toks[k]
    glued, then = (toks[k + 1 : k + 3] + [None, None])[:2]
    if glued is not None and (
        glued.text in (":", "/")
        or glued.text in ".,"
        and then is not None
        and then.kind == "num"
        or glued.kind == "word"
        and len(glued.text) == 1
    ):
        return None  # a time (3:15), a fraction or a rate (3/4, 60/h), a date (12.05.2024), a variable (7n)
    after = _near(toks, k + 1, 1)
    if after is not None and after.kind == "word" and after.text.lower() in _NOT_PLAIN:
        return None  # "= 3 hundred", "= 5x", "= 12th"
    # an operator follows: the right side is an expression ("2 * 3 = 6 * 4 = 24", "199 * 60 = 15 * x")
    chained = after is not None and (after.kind == "op" and after.text != "**" or after.text.lower() in _OP_WORDS)
    start = sign.start if sign is not None else t.start
    return _Claim(start, t.start + len(t.text), ("-" if sign else "") + t.text, t.pct, chained)


def _evaluate(left: list[_Tok]) -> Fraction | float | None:
    """The exact value of the left side, through the safe interpreter (bounds on steps and sizes included)."""
    result = run("from sympy import Rational\nresult = " + "".join(t.python for t in left))
    value = result.variables.get("result") if result.ok else None
    if isinstance(value, int | Fraction) and not isinstance(value, bool) and abs(value) <= _MAX_VALUE:
        return Fraction(value)
    return value if isinstance(value, float) and math.isfinite(value) and abs(value) <= _MAX_VALUE else None


def _decimals(written: str) -> int:
    return len(written.partition(".")[2])


def _agrees(claimed: Fraction, value: Fraction | float, decimals: int) -> bool:
    """Equal, or equal to the digits the claim shows: rounded or cut (10 / 4 = 2, 2 / 3 = 0.67, 0.666)."""
    return claimed == value or abs(claimed - value) < Fraction(1, 10**decimals)


def _show(value: Fraction | float, like: str) -> str:
    """`value` written as the claim was: the same separators, and at least its decimals where it has any."""
    places = 0
    if not (isinstance(value, Fraction) and value.denominator == 1):
        exact = next((n for n in range(7) if isinstance(value, Fraction) and (value * 10**n).denominator == 1), None)
        places = exact if exact is not None else max(_decimals(like), 2)
    return (
        f"{float(value):{',' if ',' in like else ''}.{places}f}"
        if places
        else f"{int(value):{',' if ',' in like else ''}}"
    )
