"""Program-aided checks of math answers: the rule-based kind of FoT's dynamic self-correction.

Models that write Python in their answers often make up what it prints: they write an `output` block whose
numbers the code does not produce, and then answer from those numbers. `check_code` runs each ```python block in
the safe interpreter (fot.tasks.interpreter; never exec) and compares what it really prints with the output block
that follows it. At the first block whose claimed output is wrong it returns a `CodeFailure` whose `prefix` is the
answer up to that block with the real output written in: the model continues from there (one continuation
request), so that what it concludes follows from the real numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fot.tasks.interpreter import Run, run

CODE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S | re.I)
# the block after the code that holds what it "printed": ```output, ```text or a bare fence, maybe after a short
# line such as "Output:" or "When you run this code, the output is:"
CLAIMED = re.compile(
    r"[ \t]*\n?(?:[^\n`]{0,100}\n)?[ \t]*```(?:output|text|plaintext|console)?[ \t]*\n(.*?)```", re.S | re.I
)
TOKEN = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+-]?\d+)?|[^\W\d]+|\S")


@dataclass(frozen=True)
class CodeFailure:
    """A code block whose claimed output is not what it prints."""

    code: str
    claimed: str
    actual: str
    prefix: str  # the answer up to the claimed output, with the real output in its place and the fence closed
    rest: str  # what the answer wrote after the claimed output


@dataclass(frozen=True)
class CodeCheck:
    """What checking one answer found: how many blocks ran and could be compared, and the first failure."""

    checked: int = 0
    failure: CodeFailure | None = None


def check_code(text: str) -> CodeCheck:
    checked = 0
    for m in CODE.finditer(text):
        claimed = CLAIMED.match(text, m.end())
        if claimed is None:
            continue  # nothing claimed about this block: nothing to compare
        result: Run = run(m.group(1))
        if not result.ok or not result.output.strip():
            continue  # not checkable, stopped by a bound, an error, or it prints nothing: claim nothing about it
        checked += 1
        if not same_output(claimed.group(1), result.output):
            prefix = text[: claimed.start(1)] + result.output.rstrip("\n") + "\n```\n"
            rest = text[claimed.end() :]
            failure = CodeFailure(m.group(1), claimed.group(1).strip(), result.output.strip(), prefix, rest)
            return CodeCheck(checked, failure)
    return CodeCheck(checked)


def same_output(claimed: str, actual: str) -> bool:
    """Whether a claimed output says what the real one says: the same words, and numbers equal to 1e-6 relative
    (a claimed "10" for a printed "10.0", or "6.43" for "6.428571428571429", rounded as claimed, is the same)."""
    a, b = TOKEN.findall(claimed), TOKEN.findall(actual)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        nx, ny = number(x), number(y)
        if nx is not None and ny is not None:
            decimals = len(x.partition(".")[2]) if "e" not in x.lower() else 0
            rounded = "." in x and math.isclose(round(ny, decimals), nx, rel_tol=1e-12, abs_tol=1e-12)
            if not rounded and not math.isclose(nx, ny, rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def number(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> str | None:
    """The last number in a text, as written (thousands separators dropped)."""
    found = [t for t in TOKEN.findall(text) if number(t) is not None]
    return found[-1].replace(",", "") if found else None
