"""The math verifier's worker process: reads JSON pairs [a, b] from stdin, one a line, and answers each with a line
"1" (math-verify finds them equivalent) or "0". Started by `fot.tasks.math`, which bounds every answer's time."""

from __future__ import annotations

import json
import sys

from fot.tasks.math import _mv_compare


def main() -> None:
    for line in sys.stdin:
        a, b = json.loads(line)
        sys.stdout.write("1\n" if _mv_compare(str(a), str(b)) else "0\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
