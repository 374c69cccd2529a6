"""The math verifier's worker process: reads JSON pairs [a, b] from stdin, one a line, and answers each with a line
"1" (math-verify finds them equivalent) or "0". Started by `fot.tasks.math`, which bounds every answer's time; so
math-verify's own timeouts stay off here (they rely on signals) and their warning is dropped."""

from __future__ import annotations

import json
import logging
import sys


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def equivalent(a: str, b: str) -> bool:
    """math-verify's symbolic comparison, either way round."""
    import math_verify as mv  # sympy and an ANTLR parser: about a second, paid once per worker

    try:
        pa, pb = mv.parse(f"${a}$", parsing_timeout=None), mv.parse(f"${b}$", parsing_timeout=None)
        if not pa or not pb:
            return False
        return bool(mv.verify(pa, pb, timeout_seconds=None) or mv.verify(pb, pa, timeout_seconds=None))
    except Exception:
        return False


def main() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    for line in sys.stdin:
        a, b = json.loads(line)
        sys.stdout.write("1\n" if equivalent(str(a), str(b)) else "0\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
