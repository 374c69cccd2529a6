"""What the safe interpreter (fot.tasks.interpreter) may run: the whitelist of statements, expressions, names,
modules and methods, checked over a program's whole `ast` before any of it runs."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

MATH = {
    name: getattr(math, name)
    for name in (
        "sqrt", "floor", "ceil", "trunc", "fabs", "gcd", "lcm", "log", "log2", "log10", "exp", "sin", "cos",
        "tan", "asin", "acos", "atan", "atan2", "hypot", "degrees", "radians", "isclose", "pi", "e", "tau", "inf",
        "isqrt", "fsum", "copysign", "fmod", "modf", "pow",
    )
}  # fmt: skip


class Integer(Fraction):
    """sympy's Integer: a whole number, exact in division (Integer(7) / 2 is 7/2), that also serves as an index."""

    def __new__(cls, value: Any = 0) -> Integer:
        return super().__new__(cls, int(value))

    def __index__(self) -> int:
        return int(self)


SYMPY = {"Rational": Fraction, "Integer": Integer}  # what `import sympy` binds
COUNTING = {"factorial": math.factorial, "comb": math.comb, "perm": math.perm}  # bounded arguments: see counting
MODULES = {"math": MATH | COUNTING, "sympy": SYMPY}
METHODS = {
    list: {"append", "extend", "pop", "insert", "index", "count", "sort", "reverse", "copy"},
    dict: {"items", "keys", "values", "get", "copy", "pop", "update"},
    str: {"upper", "lower", "strip", "split", "join", "startswith", "endswith", "count"},
    int: {"is_integer"},
    float: {"is_integer"},
}
STATEMENTS = (
    ast.Module, ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.If, ast.For, ast.While, ast.Break,
    ast.Continue, ast.Pass, ast.FunctionDef, ast.Return, ast.Import, ast.ImportFrom,
)  # fmt: skip
EXPRESSIONS = (
    ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.List, ast.Tuple,
    ast.Dict, ast.Subscript, ast.Slice, ast.Call, ast.Attribute, ast.ListComp, ast.GeneratorExp, ast.comprehension,
    ast.JoinedStr, ast.FormattedValue, ast.keyword, ast.arguments, ast.arg, ast.alias,
)  # fmt: skip
# the operators, each with what it computes: the interpreter's only arithmetic
BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}  # fmt: skip
COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip
CONTEXTS_AND_OPERATORS = (
    ast.Load, ast.Store, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, *BINARY, *COMPARE,
)  # fmt: skip
FORBIDDEN_NAMES = {"eval", "exec", "open", "getattr", "setattr", "delattr", "globals", "locals", "vars", "compile",
                   "input", "breakpoint", "help", "type", "object", "super", "memoryview", "dir"}  # fmt: skip


ITERABLE = (list, tuple, dict, str, range, Iterator, type({}.items()), type({}.keys()), type({}.values()))


class NotCheckable(Exception):
    """The code uses something outside the whitelist: it is not run at all."""


MAX_NESTING = 200  # node depth: deeper code is refused here, so how deep it runs never hangs on the recursion limit


def check_whitelist(tree: ast.AST) -> None:
    """Raise NotCheckable at the first node or name outside the whitelist, or nested deeper than MAX_NESTING."""
    allowed = STATEMENTS + EXPRESSIONS + CONTEXTS_AND_OPERATORS
    for node in nodes(tree):
        if not isinstance(node, allowed):
            raise NotCheckable(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and (node.id.startswith("_") and node.id != "_" or node.id in FORBIDDEN_NAMES):
            raise NotCheckable(f"the name {node.id!r} is not allowed")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise NotCheckable(f"the attribute {node.attr!r} is not allowed")
        if isinstance(node, ast.arg | ast.FunctionDef) and (
            node.arg if isinstance(node, ast.arg) else node.name
        ).startswith("_"):
            raise NotCheckable("names beginning with '_' are not allowed")
        if isinstance(node, ast.Import) and any(a.name not in MODULES for a in node.names):
            raise NotCheckable("only `import math` and `import sympy` are allowed")
        if isinstance(node, ast.ImportFrom) and (
            node.module not in MODULES or any(a.name not in MODULES[node.module] for a in node.names)
        ):
            raise NotCheckable("only the allowed names of math and sympy may be imported")
        if isinstance(node, ast.FunctionDef):
            a = node.args
            if node.decorator_list or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults:
                raise NotCheckable("only plain functions with positional parameters are allowed")
        if isinstance(node, ast.comprehension) and (node.is_async or not isinstance(node.target, ast.Name | ast.Tuple)):
            raise NotCheckable("only simple comprehensions are allowed")
        if isinstance(node, ast.ListComp | ast.GeneratorExp) and len(node.generators) != 1:
            raise NotCheckable("a comprehension may have one `for` only")
        if isinstance(node, ast.FormattedValue) and node.conversion not in (-1, ord("s"), ord("r")):
            raise NotCheckable("unknown f-string conversion")


def nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree (as `ast.walk`, without recursion), refusing any deeper than MAX_NESTING."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise NotCheckable(f"nested deeper than {MAX_NESTING}")
        yield node
        stack += [(child, depth + 1) for child in ast.iter_child_nodes(node)]
