"""Math word problems (GSM8K, MATH): find the final answer in a model's text and compare answers."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
import warnings
from collections import Counter
from fractions import Fraction
from types import MappingProxyType

from fot.errors import FotError
from fot.tasks.base import require_text
from fot.tasks.checks import check_arithmetic, check_code

# A number as models write it: thousands commas (only in groups of three), decimals, a simple fraction, a sign
# only where it cannot be a binary minus ("10-5" gives 5, "-5" gives -5).
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)(?![\d])"
)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRACTION = re.compile(r"(-?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"(-)?\\frac\{(-?\d+)\}\{(\d+)\}")
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(.*)")
_PLACEHOLDER = re.compile(r"X\W*")  # the prompt's own "finish with 'The answer is X.'", echoed back
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_LEFT = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")  # in a phrase's answer: a box the token limit cut off
_TRAILING_TEXT = re.compile(r"^(.*?\S)\s*(?:\\(?:text|textbf|mbox|textrm)\s*\{[^{}]*\}\s*(?:\^\{?\d\}?)?\s*)+$")
_UNIT_WORDS = re.compile(r"^([+-]?[\d.,/]+)\s+([A-Za-z][A-Za-z0-9^./-]*(?:\s+[A-Za-z][A-Za-z0-9^./-]*)*)$")
_NOT_UNITS = {"and", "or", "to", "of", "plus", "minus", "times", "pi", "i", "e", "sqrt"}  # words, and constants
# A hedge before a number ("about 15") and a worded aside after one ("15 (dollars)", "42 (rounded)"): not the answer
_HEDGE = re.compile(
    r"^(?:about|approximately|approx\.?|roughly|around|nearly|almost|exactly|precisely|only|~|≈|\\approx)\s*"
    r"(?=[-+$€£¥.\d\\])",
    re.I,
)
_ASIDE = re.compile(r"^([+-]?[$€£¥]?[\d.,/]+)\s+\(\s*((?=[^)]*[A-Za-z]{3})[A-Za-z][A-Za-z .,']*)\)$")
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi"}  # no aside: a factor
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_SCALED = re.compile(r"(?<![\d.,])([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s+(" + "|".join(_SCALES) + r")s?\b", re.I)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_MAX_VERIFY_CHARS = 500  # longer answers are not handed to math-verify at all
_MAX_DIGITS = 1000  # a number with more digits is compared as a string only (Python refuses int() past 4300)
VERIFY_TIMEOUT_S = 5.0  # seconds one math-verify comparison may take
VERIFY_TRIES = 2  # comparisons of one pair that may time out before it is not equivalent for good
SCORE_TIMEOUT_S = 60.0  # a score's comparison (`equivalent(..., strict=True)`): none in time is an error
# What sympy would try to evaluate at any cost (with `_power_tower`): a 4+-digit exponent, a factorial of a 3+-digit
# number or of an expression, a double factorial.
_HUGE = re.compile(r"\^\s*\{?\s*[-+]?\d{4,}|\d{3,}\s*!|[)}]\s*!|!\s*!")
_EXPONENT = re.compile(r"\^\s*[-+]?\s*(?:\\left\s*)?(?:([{(\[])|[\w.]+\s*\^)")  # a group opens, or a bare tower


def _power_tower(s: str) -> bool:
    """Whether an exponent holds a power: `9^{9^9}`, `9^{{9}^9}`, `9^(9^9)`, `9^[9^9]`, `9^-9^9`, `9^9^9`."""
    for m in _EXPONENT.finditer(s):
        if m.group(1) is None:  # a bare tower
            return True
        depth = 0
        for c in s[m.start(1) :]:
            depth += (c in "{([") - (c in "})]")
            if c == "^":
                return True
            if depth == 0:
                break
    return False


def _unscale(s: str) -> str:
    """'4.5 million' -> '4500000', '2 thousand eggs' -> '2000 eggs': a scale word multiplies, it is no unit (a
    dozen may be what was asked for, so it stays one)."""

    def times(m: re.Match) -> str:
        if len(m[1]) > _MAX_DIGITS:  # compared as a string, as any number that long
            return m[0]
        v = Fraction(m[1].replace(",", "")) * _SCALES[m[2].lower()]
        return str(v.numerator) if v.denominator == 1 else str(v)

    return _SCALED.sub(times, s)


def _last_boxed(text: str) -> str | None:
    """The content of the last non-empty \\boxed{...} / \\fbox{...} with balanced (possibly nested) braces.

    Braces are matched once for the whole text (a stack), so a text full of unclosed boxes costs linear time.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            closing[stack.pop()] = i
    for match in reversed(matches):
        start = match.end()
        end = closing.get(start - 1)
        if end is not None and text[start:end].strip():
            return text[start:end].strip()
    return None


_BOLD = re.compile(r"(?<![\w)])\*\*(?=\S)(.*?\S)\*\*(?![\w(])")  # Markdown's **x**, not the power in 2**10
_POWER = re.compile(r"([\w)\]}])(?:\*\*|\s+\*\*\s+)(?=[\w(\[{.+-])")  # Python's power, between two operands


def _strip_delimiters(s: str) -> str:
    s = _POWER.sub(r"\1^", _BOLD.sub(r"\1", s.strip())).replace("**", "").replace("−", "-")
    s = s.replace("\\$", "").replace("$", "")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    return s.strip()


def _canonical_number(s: str) -> str:
    """'1,234.50' -> '1234.5', '18.00' -> '18', '+.5' -> '0.5', '-0' -> '0'."""
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-").replace(",", "")
    whole, _, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    return out if out == "0" else sign + out


def _canonical_once(s: str) -> str:
    s = _strip_delimiters(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.rstrip(" .").strip()
    s = _HEDGE.sub("", s)
    aside = _ASIDE.fullmatch(s)
    if aside and not set(aside.group(2).lower().replace(",", " ").split()) & _MATH_WORDS:
        s = aside.group(1)
    s = re.sub(r"\s*(?:\^\s*\{?\\circ\}?|°|\\%|%)$", "", s)
    whole_text = re.fullmatch(r"\\(?:text|textbf|mbox|textrm)\s*\{([^{}]*)\}", s)
    if whole_text:
        s = whole_text.group(1)
    else:
        trailing = _TRAILING_TEXT.fullmatch(s)
        if trailing:
            s = trailing.group(1)
    s = _unscale(s.lstrip("€£¥").strip())
    units = _UNIT_WORDS.fullmatch(s)
    if units and not (set(units.group(2).lower().split()) & _NOT_UNITS):
        s = units.group(1)
    s = s.rstrip(" .").strip()
    if _PLAIN_NUMBER.fullmatch(s):
        s = _canonical_number(s)
    return s


def canonical_answer(s: str) -> str:
    """Canonical form of one answer: no $ or units, no thousands commas, '18.00' -> '18'; LaTeX kept as written."""
    for _ in range(4):
        nxt = _canonical_once(s)
        if nxt == s:
            break
        s = nxt
    return s


def _phrase_answer(candidate: str) -> str | None:
    """The answer after 'The answer is' / 'Answer:' up to the end of the sentence, or None if it is only prose."""
    end = _SENTENCE_END.search(candidate)
    if end:
        candidate = candidate[: end.start()]
    answer = canonical_answer(candidate)
    if not answer or _BOX_LEFT.search(answer) or not re.search(r"\w", answer):  # cut off: an empty box, a "\["
        return None
    words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", answer))
    if len(words) > 1:  # prose ("3 times 3, which is 9", "she has 5 apples left"): its last number, if any
        numbers = _NUMBER.findall(re.sub(r"\\frac\s*\{(-?\d+)\}\s*\{(\d+)\}", r"\1/\2", _unscale(answer)))
        return canonical_answer(numbers[-1]) if numbers else None
    return answer


def _float_noise(s: str) -> bool:
    """A decimal written to 6 places or more: how code prints a float's rounding error (14.999999999999998)."""
    return bool(_PLAIN_NUMBER.fullmatch(s)) and len(s.partition(".")[2]) >= 6


def to_fraction(s: str) -> Fraction | None:
    """The exact value of a canonical numeric answer ('0.5', '-3/4', '\\frac{1}{2}'), else None."""
    if sum(c.isdigit() for c in s) > _MAX_DIGITS:
        return None
    if _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s.replace(",", ""))
    match = _FRACTION.fullmatch(s)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    match = _LATEX_FRACTION.fullmatch(s)
    if match and int(match.group(3)) != 0:
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return -value if match.group(1) else value
    return None


class _Verifier:
    """math-verify in one worker process (`fot.tasks.verify_worker`), each comparison bounded by
    `VERIFY_TIMEOUT_S`: sympy can work without end on some answers ('9^{9^{9}}'), its own timeouts need signals
    (the main thread only), and a thread cannot be stopped. A comparison past the bound kills the worker (a new one
    starts on the next call) and gives no verdict (None). A worker that dies mid-comparison is replaced and asked
    again, once; a worker that cannot start, or dies twice, is an error, not a verdict."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def _ask(self, a: str, b: str, timeout: float) -> bool | None:
        """The worker's verdict, or None when it gave none within `timeout` seconds; OSError if it died."""
        self.proc.stdin.write(json.dumps([a, b]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if line not in ("0\n", "1\n"):  # end of file, or garbage: the worker is gone
            raise BrokenPipeError(f"the math-verify worker answered {line[:80]!r}")
        return line == "1\n"

    def start(self) -> None:
        """Start the worker now rather than at the first comparison, which would wait for sympy's import."""
        with self.lock:
            self._start()

    def _start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [sys.executable, "-m", "fot.tasks.verify_worker"]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            started = self._ask("1", "1", 120)  # importing sympy takes seconds: not part of the bound
        except (OSError, ValueError) as e:
            started = e
        if started is not True:
            self._stop()
            raise FotError(f"the math-verify worker (python -m fot.tasks.verify_worker) did not start: {started}")

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __call__(self, a: str, b: str, timeout: float | None = None) -> bool | None:
        with self.lock:
            for attempt in (1, 2):
                self._start()
                try:
                    verdict = self._ask(a, b, VERIFY_TIMEOUT_S if timeout is None else timeout)
                    break
                except (OSError, ValueError) as e:  # it died under this comparison (a broken pipe, end of file)
                    self._stop()
                    if attempt == 2:
                        raise FotError(f"the math-verify worker died twice comparing {a[:80]!r}: {e}") from None
            if verdict is None:
                self._stop()
            return verdict


_verifier = _Verifier()
start_verifier = _verifier.start


_timeouts: Counter[tuple[str, str]] = Counter()
_verdicts: dict[tuple[str, str], bool] = {}  # a pair's verdict, whatever bound it was reached within
_verdicts_lock = threading.Lock()
_MAX_VERDICTS = 4096  # the oldest is dropped past this


def _mv_verdict(a: str, b: str, timeout: float | None = None) -> bool | None:
    """math-verify's verdict on a pair, remembered; None (not remembered) when it gave none within the bound."""
    verdict = _verdicts.get((a, b))
    if verdict is None:
        verdict = _verifier(a, b, timeout)
        if verdict is not None:
            with _verdicts_lock:
                if len(_verdicts) >= _MAX_VERDICTS:
                    del _verdicts[next(iter(_verdicts))]
                _verdicts[a, b] = verdict
    return verdict


def _mv_equivalent(a: str, b: str, strict: bool = False) -> bool:
    """math-verify's verdict, for answers short enough and free of towers of powers and huge factorials (which
    sympy would try to evaluate); anything else is not equivalent. A comparison past its bound is not equivalent
    too, with a warning, since it may decide a vote or a score. It is asked again next time (a busy machine may
    have slowed it), up to `VERIFY_TRIES` times in all: a search compares the same answers at every step."""
    if (
        len(a) > _MAX_VERIFY_CHARS
        or len(b) > _MAX_VERIFY_CHARS
        or any(_HUGE.search(x) or _power_tower(x) for x in (a, b))
    ):
        return False
    if strict:
        verdict = _mv_verdict(a, b, SCORE_TIMEOUT_S)
        if verdict is None:
            raise FotError(f"math-verify gave no verdict on {a[:80]!r} against {b[:80]!r} in {SCORE_TIMEOUT_S} s")
        return verdict
    if _timeouts[a, b] >= VERIFY_TRIES:
        return False
    verdict = _mv_verdict(a, b)
    if verdict is None:
        _timeouts[a, b] += 1
        warnings.warn(
            f"math-verify gave no verdict on {a[:80]!r} against {b[:80]!r} within {VERIFY_TIMEOUT_S} s "
            f"(try {_timeouts[a, b]} of {VERIFY_TRIES}): counted as not equivalent",
            stacklevel=3,
        )
        return False
    return verdict


class MathTask:
    """GSM8K- and MATH-style problems: free-form reasoning with one final answer."""

    name = "math"
    tree = "mctsr"
    checks = MappingProxyType({"code": check_code, "arithmetic": check_arithmetic})

    def parse(self, problem: str) -> str:
        """Any non-empty text is a math problem."""
        return require_text(problem, "a math problem")

    def extract(self, text: str) -> str | None:
        """Last \\boxed{}, else last 'The answer is X' / 'Answer: X', else last '#### X', else the last number."""
        if not isinstance(text, str) or not text.strip():
            return None
        text = text.replace("−", "-")  # unicode minus
        boxed = _last_boxed(text)
        if boxed is not None:
            answer = canonical_answer(boxed)
            if answer:
                return answer
        for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
            answer = _phrase_answer(text[match.end() :])
            if answer and not _PLACEHOLDER.fullmatch(answer):
                return answer
        for match in reversed(list(_GSM8K.finditer(text))):
            answer = canonical_answer(match.group(1))
            if answer:
                return answer
        numbers = _NUMBER.findall(text)
        return canonical_answer(numbers[-1]) if numbers else None

    def equivalent(self, a: str, b: str, strict: bool = False) -> bool:
        """Same string, else same number (to 1e-6 relative; exactly where one is whole, unless the other shows a
        float's rounding noise), else math-verify says so. `strict` (scoring): math-verify gets `SCORE_TIMEOUT_S`,
        and no verdict in that time is a `FotError`, not "not equivalent"."""
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        a, b = canonical_answer(a), canonical_answer(b)
        if not a or not b:
            return False
        if a == b:
            return True
        x, y = to_fraction(a), to_fraction(b)
        if x is not None and y is not None:
            close = abs(x - y) <= Fraction(1, 10**6) * max(abs(x), abs(y))
            if x.denominator == 1 or y.denominator == 1:  # 1000001 is not 1000000, nor 25000019.5 25000000
                return x == y or close and (_float_noise(a) or _float_noise(b))  # 14.999999999999998 is 15
            return close
        return _mv_equivalent(a, b, strict)

    def check(self, problem: str, text: str) -> list[str]:
        """The only rule a math answer can be held to without the reference: it must give a final answer."""
        return ["no final answer"] if self.extract(text) is None else []
