"""A safe, bounded interpreter for the arithmetic programs models write in their answers (program-aided checks).

Model text is untrusted: it is never given to `exec` or `eval`. The code is parsed with `ast`, every node is
checked against the whitelist of fot.tasks.whitelist before anything runs, and the tree is then walked here.
Allowed: assignment, `if`, `for`/`while` with `break`/`continue`, plain functions, arithmetic, comparisons,
lists/tuples/dicts, indexing, one-generator comprehensions, f-strings, a few builtins and list/dict/str methods,
and `math` (and sympy's `Rational`/`Integer`) bound to the whitelist's own tables: nothing is imported. Never:
other attributes, names beginning with `_`, `eval`/`exec`/`open`/`getattr`, classes, lambdas, `with`, `try`.

Bounds (`Limits`): evaluation steps (a loop that never ends stops there), integer bits (a huge power is refused
before it is computed), sequence and string sizes, items created over the run (the memory bound), printed
output, call depth and source length. Code outside the whitelist is "not checkable" and never runs; code that
breaks a bound or raises is reported as such. Either way, nothing is claimed about its output.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, ValuesView
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from fot.tasks.whitelist import (
    BINARY,
    COMPARE,
    COUNTING,
    ITERABLE,
    METHODS,
    MODULES,
    Integer,
    NotCheckable,
    check_whitelist,
)

PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?")  # width and precision of each field


class Bound(Exception):
    """The run broke a bound (steps, number size, sequence length, output, depth)."""


# ---- printing: a program's exact fractions are sympy's `Rational`s (it imports no other kind), printed as `a/b` ----
PRINT_ITEMS = 100_000  # items one conversion to text may visit, shared parts counted each time they print
PRINT_DEPTH = 200


CONTAINERS = (list, tuple, dict, KeysView, ValuesView, ItemsView)  # what CPython walks item by item natively
WALKING = {"index", "count", "sort", "get", "pop", "update", "sorted", "min", "max"}  # callables that compare or hash


def scan(v: Any, cap: int, doing: str) -> tuple[bool, int]:
    """Whether `v` holds a fraction, and how many items native code that walks it (printing, ==, hashing, `in`)
    visits: shared parts once each time they are met, so a list of itself doubled 40 times is 2^40 items. Bound
    past `cap` visits or PRINT_DEPTH deep; a container inside itself is not entered, as CPython prints `[...]`."""
    found, visits, path, stack = False, 0, set(), [(v, False)]
    while stack:
        x, leaving = stack.pop()
        if leaving:
            path.discard(id(x))
            continue
        visits += 1
        if visits > cap:
            raise Bound(f"{doing} would visit over {cap} items")
        found = found or isinstance(x, Fraction)
        if isinstance(x, CONTAINERS) and id(x) not in path:
            if len(path) >= PRINT_DEPTH:
                raise Bound(f"containers nested over {PRINT_DEPTH} deep")
            path.add(id(x))
            stack.append((x, True))
            stack.extend((y, False) for y in ((*x, *x.values()) if isinstance(x, dict) else x))
    return found, visits


def walk(v: Any) -> bool:
    """Whether printing `v` meets a fraction; Bound if it would visit over PRINT_ITEMS items."""
    return scan(v, PRINT_ITEMS, "printing this")[0]


def show(v: Any, inner: bool = False) -> str:
    """`str(v)` (`repr` if `inner`) as the program's Python prints it: CPython's own unless it holds a fraction."""
    if walk(v):
        return shown(v, frozenset())
    return repr(v) if inner else str(v)


def shown(v: Any, within: frozenset[int]) -> str:
    """repr(v) with fractions as `a/b`; a container met again inside itself prints as CPython's `[...]`."""
    if isinstance(v, Fraction):
        return str(v)
    if not isinstance(v, list | tuple | dict):
        return repr(v)
    if id(v) in within:
        return "[...]" if isinstance(v, list) else "(...)" if isinstance(v, tuple) else "{...}"
    inside = within | {id(v)}
    if isinstance(v, dict):
        return "{" + ", ".join(f"{shown(k, inside)}: {shown(x, inside)}" for k, x in v.items()) + "}"
    items = ", ".join(shown(x, inside) for x in v)
    return f"[{items}]" if isinstance(v, list) else f"({items}{',' if len(v) == 1 else ''})"


class Shown:
    """A %-format argument that holds fractions: `%s` and `%r` print it as `show` does; `%d`, `%f` and a mapping
    key reach the value itself."""

    def __init__(self, v: Any):
        self.v = v

    def __str__(self) -> str:
        return show(self.v)

    def __repr__(self) -> str:
        return show(self.v, inner=True)

    def __int__(self) -> int:
        return int(self.v)

    def __float__(self) -> float:
        return float(self.v)

    def __getitem__(self, key: Any) -> Any:
        return self.v[key]


def percent_args(b: Any) -> Any:
    """The right operand of `text % b`, each argument that holds a fraction wrapped in `Shown` (the caller has
    walked the whole operand within PRINT_ITEMS first, and charged it)."""

    def wrap(x: Any) -> Any:
        return Shown(x) if walk(x) else x

    if isinstance(b, tuple):
        return tuple(wrap(x) for x in b)
    if isinstance(b, dict):
        return {k: wrap(x) for k, x in b.items()}
    return wrap(b)


@dataclass
class Run:
    """What running a program gave: its printed output, or why there is none."""

    output: str = ""
    status: str = "ok"  # ok | not_checkable | bound | error
    reason: str = ""
    variables: dict[str, Any] = field(default_factory=dict)
    steps: int = 0  # the steps it took, against `Limits.max_steps`

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Limits:
    max_steps: int = 100_000
    max_bits: int = 4096
    max_items: int = 10_000
    max_alloc: int = 1_000_000  # items and characters created over the whole run: the memory bound
    max_output: int = 10_000
    max_depth: int = 20
    max_code: int = 20_000  # characters of source


def run(code: str, limits: Limits | None = None) -> Run:
    """Run `code` under the whitelist and bounds; never raises."""
    limits = limits or Limits()
    if len(code) > limits.max_code:
        return Run(status="not_checkable", reason=f"over {limits.max_code} characters")
    try:
        tree = ast.parse(code)
        check_whitelist(tree)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return Run(status="not_checkable", reason=f"does not parse: {e}")
    except NotCheckable as e:
        return Run(status="not_checkable", reason=str(e))
    machine = _Machine(limits)
    result = _execute(machine, tree)
    result.steps = machine.steps
    return result


def _execute(machine: _Machine, tree: ast.Module) -> Run:
    try:
        machine.block(tree.body, machine.globals)
    except _Return:
        return Run(output=machine.text(), status="error", reason="return outside a function")
    except (_Break, _Continue):
        return Run(output=machine.text(), status="error", reason="break or continue outside a loop")
    except NotCheckable as e:
        return Run(output=machine.text(), status="not_checkable", reason=str(e))
    except Bound as e:
        return Run(output=machine.text(), status="bound", reason=str(e))
    except RecursionError:
        return Run(output=machine.text(), status="bound", reason="too deeply nested")
    except Exception as e:  # the program's own error (ZeroDivisionError, NameError, ...): it has no output to trust
        return Run(output=machine.text(), status="error", reason=error_reason(e))
    shown = {k: v for k, v in machine.globals.items() if not isinstance(v, _Function | _Module) and not callable(v)}
    return Run(output=machine.text(), variables=shown)


def error_reason(e: Exception) -> str:
    """The program's error, named without printing what it holds: a KeyError's key can be a tuple nested 15000
    deep, or a list of itself doubled 40 times, whose text alone would recurse or never end."""
    if any(isinstance(a, CONTAINERS) for a in e.args):
        return type(e).__name__
    try:
        return f"{type(e).__name__}: {str(e)[:200]}"
    except Exception:  # RecursionError and the like
        return type(e).__name__


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Return(Exception):
    def __init__(self, value: Any):
        self.value = value


@dataclass
class _Function:
    node: ast.FunctionDef


class _Machine:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.steps = 0
        self.depth = 0
        self.out: list[str] = []
        self.out_len = 0
        self.allocated = 0
        self.globals: dict[str, Any] = {}
        self.builtins: dict[str, Callable] = {
            "print": self.print, "round": self.round, "int": self.int, "float": float, "abs": abs, "str": self.str,
            "bool": bool, "min": self.min, "max": self.max, "sum": self.sum, "len": len, "range": range,
            "list": self.list, "sorted": self.sorted, "tuple": lambda xs=(): tuple(self.items(xs)),
            "enumerate": lambda xs, start=0: enumerate(self.items(xs), start),
            "zip": lambda *xss: zip(*(self.items(xs) for xs in xss), strict=False),
        }  # fmt: skip

    # ---- bounds -------------------------------------------------------------------------------------------------
    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise Bound(f"over {self.limits.max_steps} steps")

    def value(self, v: Any) -> Any:
        """Check a value against the size bounds."""
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > self.limits.max_bits:
            raise Bound(f"an integer over {self.limits.max_bits} bits")
        if isinstance(v, Fraction) and v.numerator.bit_length() + v.denominator.bit_length() > self.limits.max_bits:
            raise Bound(f"a fraction over {self.limits.max_bits} bits")
        if isinstance(v, str | list | tuple | dict) and len(v) > self.limits.max_items:
            raise Bound(f"a sequence over {self.limits.max_items} items")
        return v

    def fresh(self, v: Any) -> Any:
        """A value the program just created: checked, and its size counted against the memory bound."""
        self.value(v)
        if isinstance(v, str | list | tuple | dict):
            self.alloc(len(v))
        return v

    def alloc(self, n: int) -> None:
        self.allocated += n
        if self.allocated > self.limits.max_alloc:
            raise Bound(f"over {self.limits.max_alloc} items created (the memory bound)")

    def nested(self, *vs: Any) -> None:
        """Before native code walks these values item by item (==, `in`, hashing a key, index, sorting): a value
        that holds containers is charged its items as steps, shared parts each time they are met, so a list of
        itself doubled 40 times stops at the step bound instead of running in C. Flat values cost nothing: their
        walk is bounded by their length."""
        for v in vs:
            if not isinstance(v, CONTAINERS):
                continue
            inside = (*v, *v.values()) if isinstance(v, dict) else v
            if any(isinstance(x, CONTAINERS) for x in inside):
                self.tick(scan(v, PRINT_ITEMS, "walking this value")[1])

    def items(self, xs: Iterable) -> Iterator:
        """Iterate anything, one step per item (so sum(range(10**12)) stops at the step bound)."""
        if not isinstance(xs, ITERABLE):
            raise TypeError(f"{type(xs).__name__} is not iterable")
        for x in xs:
            self.tick()
            yield x

    def text(self) -> str:
        return "".join(self.out)

    # ---- builtins ----------------------------------------------------------------------------------------------
    def print(self, *args: Any, sep: str = " ", end: str = "\n") -> None:
        line = sep.join(self.str(a) for a in args) + end
        self.out_len += len(line)
        if self.out_len > self.limits.max_output:
            raise Bound(f"over {self.limits.max_output} characters of output")
        self.out.append(line)

    def str(self, v: Any = "") -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            self.value(v)
        return self.fresh(show(v))

    def int(self, v: Any = 0, base: int | None = None) -> int:
        if isinstance(v, str) and len(v) > 100:
            raise Bound("int() of a long string")
        return self.value(int(v) if base is None else int(v, base))

    def round(self, v: Any, digits: int | None = None) -> Any:
        if digits is not None and abs(digits) > 100:
            raise Bound("round() to over 100 digits")
        return round(v) if digits is None else round(v, digits)

    def list(self, xs: Iterable = ()) -> list:
        return self.fresh(list(self.items(xs)))

    def sorted(self, xs: Iterable, reverse: bool = False) -> list:
        out = self.list(xs)
        self.tick(len(out))
        return sorted(out, reverse=reverse)

    def sum(self, xs: Iterable, start: Any = 0) -> Any:
        total = start
        for x in self.items(xs):
            total = self.fresh(total + x)  # sum(lists, []) builds a new list each step
        return total

    def min(self, *args: Any) -> Any:
        return min(self.list(args[0]) if len(args) == 1 else args)

    def max(self, *args: Any) -> Any:
        return max(self.list(args[0]) if len(args) == 1 else args)

    # ---- statements --------------------------------------------------------------------------------------------
    def block(self, body: list[ast.stmt], env: dict[str, Any]) -> None:
        for stmt in body:
            self.stmt(stmt, env)

    def stmt(self, s: ast.stmt, env: dict[str, Any]) -> None:
        self.tick()
        if isinstance(s, ast.Expr):
            self.expr(s.value, env)
        elif isinstance(s, ast.Assign):
            v = self.expr(s.value, env)
            for target in s.targets:
                self.assign(target, v, env)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self.assign(s.target, self.expr(s.value, env), env)
        elif isinstance(s, ast.AugAssign):
            self.augment(s, env)
        elif isinstance(s, ast.If):
            self.block(s.body if self.expr(s.test, env) else s.orelse, env)
        elif isinstance(s, ast.For | ast.While):
            self.loop(s, env)
        elif isinstance(s, ast.Break):
            raise _Break
        elif isinstance(s, ast.Continue):
            raise _Continue
        elif isinstance(s, ast.Pass):
            pass
        elif isinstance(s, ast.FunctionDef):
            env[s.name] = _Function(s)
        elif isinstance(s, ast.Return):
            raise _Return(None if s.value is None else self.expr(s.value, env))
        elif isinstance(s, ast.Import):
            for a in s.names:
                env[a.asname or a.name] = _Module(a.name)
        elif isinstance(s, ast.ImportFrom):
            for a in s.names:
                env[a.asname or a.name] = self.attribute(_Module(s.module), a.name)
        else:  # pragma: no cover - the whitelist admits nothing else
            raise NotCheckable(type(s).__name__)

    def loop(self, s: ast.For | ast.While, env: dict[str, Any]) -> None:
        """`for` and `while`: the body once per turn; `break` skips the `else`."""
        for _ in self.turns(s, env):
            try:
                self.block(s.body, env)
            except _Break:
                return
            except _Continue:
                continue
        self.block(s.orelse, env)

    def turns(self, s: ast.For | ast.While, env: dict[str, Any]) -> Iterator[None]:
        if isinstance(s, ast.For):
            for item in self.items(self.expr(s.iter, env)):
                self.assign(s.target, item, env)
                yield
            return
        while self.expr(s.test, env):
            self.tick()
            yield

    def assign(self, target: ast.expr, v: Any, env: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = self.value(v)
        elif isinstance(target, ast.Tuple | ast.List):
            values = self.list(v)
            if len(values) != len(target.elts):
                raise ValueError(f"cannot unpack {len(values)} values into {len(target.elts)}")
            for t, x in zip(target.elts, values, strict=True):
                self.assign(t, x, env)
        elif isinstance(target, ast.Subscript):
            container = self.expr(target.value, env)
            self.store(container, self.expr(target.slice, env), v)
        else:
            raise NotCheckable(f"assignment to {type(target).__name__}")

    def item(self, container: Any, key: Any) -> Any:
        self.nested(key)  # a tuple key is hashed item by item
        return self.value(container[key])

    def store(self, container: Any, key: Any, v: Any) -> None:
        if not isinstance(container, list | dict):
            raise TypeError(f"{type(container).__name__} does not support item assignment")
        self.nested(key)
        container[key] = self.list(v) if isinstance(key, slice) else v  # a range is not built in C
        self.value(container)

    def augment(self, s: ast.AugAssign, env: dict[str, Any]) -> None:
        """`target op= value` as CPython runs it: a subscript's container and key evaluated once, and a list's
        `+=` and `*=` changing the list itself (which every other name for it sees)."""
        t = s.target
        self.tick()  # reading the target: a step, as reading any expression is
        if isinstance(t, ast.Name):
            current = self.name(t.id, env)
        elif isinstance(t, ast.Subscript):
            container, key = self.expr(t.value, env), self.expr(t.slice, env)
            current = self.item(container, key)
        else:
            raise NotCheckable(f"augmented assignment to {type(t).__name__}")
        v = self.expr(s.value, env)
        if isinstance(current, list) and isinstance(s.op, ast.Add | ast.Mult):
            current[:] = self.binary(s.op, current, self.list(v) if isinstance(s.op, ast.Add) else v)
            new = current
        else:
            new = self.binary(s.op, current, v)
        if isinstance(t, ast.Name):
            self.assign(t, new, env)
        else:
            self.store(container, key, new)

    # ---- expressions -------------------------------------------------------------------------------------------
    def expr(self, e: ast.expr, env: dict[str, Any]) -> Any:
        self.tick()
        if isinstance(e, ast.Constant):
            if not isinstance(e.value, int | float | str | bool | type(None)):
                raise NotCheckable(f"a {type(e.value).__name__} literal")
            return self.value(e.value)
        if isinstance(e, ast.Name):
            return self.name(e.id, env)
        if isinstance(e, ast.BinOp):
            return self.binary(e.op, self.expr(e.left, env), self.expr(e.right, env))
        if isinstance(e, ast.UnaryOp):
            v = self.expr(e.operand, env)
            return not v if isinstance(e.op, ast.Not) else (-v if isinstance(e.op, ast.USub) else +v)
        if isinstance(e, ast.BoolOp):
            v = None
            for part in e.values:
                v = self.expr(part, env)
                if (not v) if isinstance(e.op, ast.And) else v:
                    return v
            return v
        if isinstance(e, ast.Compare):
            left = self.expr(e.left, env)
            for op, right_node in zip(e.ops, e.comparators, strict=True):
                right = self.expr(right_node, env)
                self.nested(left, right)
                if isinstance(right, range) and not isinstance(left, int) and len(right) > self.limits.max_items:
                    raise Bound(f"`in` a range of over {self.limits.max_items} items, with no integer to look up")
                if not COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(e, ast.IfExp):
            return self.expr(e.body if self.expr(e.test, env) else e.orelse, env)
        if isinstance(e, ast.List):
            return self.fresh([self.expr(x, env) for x in e.elts])
        if isinstance(e, ast.Tuple):
            return self.fresh(tuple(self.expr(x, env) for x in e.elts))
        if isinstance(e, ast.Dict):
            if any(k is None for k in e.keys):
                raise NotCheckable("dict unpacking")
            pairs = [(self.expr(k, env), self.expr(v, env)) for k, v in zip(e.keys, e.values, strict=True)]
            self.nested(*(k for k, _ in pairs))
            return self.fresh(dict(pairs))
        if isinstance(e, ast.Subscript):
            return self.item(self.expr(e.value, env), self.expr(e.slice, env))
        if isinstance(e, ast.Slice):
            parts = (e.lower, e.upper, e.step)
            return slice(*(None if p is None else self.expr(p, env) for p in parts))
        if isinstance(e, ast.Call):
            return self.call(e, env)
        if isinstance(e, ast.Attribute):
            return self.attribute(self.expr(e.value, env), e.attr)
        if isinstance(e, ast.ListComp | ast.GeneratorExp):
            return self.fresh(self.comprehension(e, env))
        if isinstance(e, ast.JoinedStr):
            return self.fresh("".join(self.fstring_part(p, env) for p in e.values))
        raise NotCheckable(type(e).__name__)  # pragma: no cover

    def name(self, name: str, env: dict[str, Any]) -> Any:
        for scope in (env, self.globals):
            if name in scope:
                return scope[name]
        if name in self.builtins:
            return self.builtins[name]
        if hasattr(builtins, name):
            raise NotCheckable(f"the builtin {name!r} is not allowed")
        raise NameError(f"name {name!r} is not defined")

    def binary(self, op: ast.operator, a: Any, b: Any) -> Any:
        whole = isinstance(b, int) or (isinstance(b, Fraction) and b.denominator == 1)
        if isinstance(op, ast.Pow) and not whole and any(isinstance(x, Fraction | Integer) for x in (a, b)):
            raise NotCheckable("a sympy number to a power that is not whole (sympy keeps sqrt(2) exact)")
        if isinstance(op, ast.Pow) and isinstance(a, int | Fraction) and isinstance(b, int | Fraction):
            exact = b.denominator == 1 and (isinstance(a, Fraction) or isinstance(b, Fraction) or b > 0)
            size = max(abs(a.numerator), a.denominator)  # int ** negative int is a float: no bound needed
            if exact and size > 1 and (size.bit_length() - 1) * abs(b.numerator) > self.limits.max_bits:
                raise Bound(f"a power over {self.limits.max_bits} bits")  # before computing it, not after
        if isinstance(op, ast.Mod) and isinstance(a, str):
            if re.search(r"%\([^)]*\(", a):  # CPython balances a key's parentheses; PERCENT_SPEC would stop early
                raise NotCheckable("a %-format key with parentheses")
            for width, precision in PERCENT_SPEC.findall(a):
                if "*" in width + precision or int(width or 0) > 200 or int(precision or 0) > 200:
                    raise Bound("a %-format asks for over 200 characters")
            found, visits = scan(b, PRINT_ITEMS, "formatting this")
            self.tick(visits)  # every argument is walked, named by the format or not
            if found:
                b = percent_args(b)
        if isinstance(op, ast.Mult):
            for seq, n in ((a, b), (b, a)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int | Integer)
                    and len(seq) * n > self.limits.max_items
                ):
                    raise Bound(f"a sequence over {self.limits.max_items} items")
        if isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
            if a.bit_length() + b.bit_length() > self.limits.max_bits + 1:
                raise Bound(f"an integer over {self.limits.max_bits} bits")
        return self.fresh(BINARY[type(op)](a, b))

    def attribute(self, obj: Any, attr: str) -> Any:
        if isinstance(obj, _Module):
            if attr in COUNTING and obj.name == "math":
                return self.counting(attr)
            if attr not in MODULES[obj.name]:
                raise NotCheckable(f"{obj.name}.{attr} is not allowed")
            return MODULES[obj.name][attr]
        allowed = METHODS.get(type(obj), set())
        if attr not in allowed:
            raise NotCheckable(f"{type(obj).__name__}.{attr} is not allowed")
        return getattr(obj, attr)

    def call(self, e: ast.Call, env: dict[str, Any]) -> Any:
        f = self.expr(e.func, env)
        if any(isinstance(a, ast.Starred) for a in e.args) or any(k.arg is None for k in e.keywords):
            raise NotCheckable("* and ** in calls")
        args = [self.expr(a, env) for a in e.args]
        kwargs = {k.arg: self.expr(k.value, env) for k in e.keywords}
        if isinstance(f, _Function):
            return self.call_function(f, args, kwargs)
        owner = getattr(f, "__self__", None)
        name = getattr(f, "__name__", "")
        if name in WALKING:  # they compare or hash the values they are given (len, append... do not)
            self.nested(owner, *args)
        if args and (f is MODULES["math"]["fsum"] or isinstance(owner, list | dict) and name in ("extend", "update")):
            args[0] = args[0] if isinstance(args[0], dict) else self.list(args[0])  # iterated here, step by step
        if f in (Fraction, Integer) and any(isinstance(a, str) and (len(a) > 100 or "e" in a.lower()) for a in args):
            raise Bound("Rational of a long string or one with an exponent (10**exponent is built to parse it)")
        if isinstance(owner, str) and f.__name__ == "join" and args:
            parts = self.list(args[0])
            if sum(len(x) for x in parts if isinstance(x, str)) + len(owner) * len(parts) > self.limits.max_items:
                raise Bound(f"a string over {self.limits.max_items} characters")
        before = len(owner) if isinstance(owner, list | dict) else 0
        result = self.fresh(f(*args, **kwargs))
        if isinstance(owner, list | dict):  # a method such as extend grew it: at most doubled, then checked here
            self.value(owner)
            self.alloc(max(len(owner) - before, 0))
        return result

    def counting(self, name: str) -> Callable:
        """math.factorial, comb and perm, refused past 1000 (their cost grows faster than their result's size)."""

        def bounded(*args: int) -> int:
            if any(not isinstance(a, int) or a > 1000 for a in args):
                raise Bound(f"math.{name} of an argument over 1000")
            return COUNTING[name](*args)

        return bounded

    def call_function(self, f: _Function, args: list, kwargs: dict) -> Any:
        params = [a.arg for a in f.node.args.args]
        if len(args) > len(params) or set(kwargs) - set(params):
            raise TypeError(f"{f.node.name}() got the wrong arguments")
        local = dict(zip(params, args, strict=False)) | kwargs
        if set(local) != set(params):
            raise TypeError(f"{f.node.name}() is missing arguments")
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise Bound(f"calls nested over {self.limits.max_depth} deep")
        try:
            self.block(f.node.body, local)
        except _Return as r:
            return r.value
        finally:
            self.depth -= 1
        return None

    def comprehension(self, e: ast.ListComp | ast.GeneratorExp, env: dict[str, Any]) -> list:
        gen = e.generators[0]
        local = dict(env)
        out = []
        for item in self.items(self.expr(gen.iter, env)):
            self.assign(gen.target, item, local)
            if all(self.expr(cond, local) for cond in gen.ifs):
                out.append(self.expr(e.elt, local))
                self.value(out)
        return out

    def fstring_part(self, p: ast.expr, env: dict[str, Any]) -> str:
        if isinstance(p, ast.Constant):
            return str(p.value)
        v = self.expr(p.value, env)
        spec = self.fstring_spec(p.format_spec, env) if p.format_spec is not None else ""
        if p.conversion == ord("r"):
            v = show(v, inner=True)
        elif p.conversion == -1 and not spec:  # `{x}` and `{x:}` are str(x): a fraction in a list prints as a/b
            v = self.value(show(v))
        if len(spec) > 20 or any(int(d) > 200 for d in re.findall(r"\d+", spec)):
            raise Bound("an f-string format asks for over 200 characters")
        return self.value(format(self.str(v) if p.conversion == ord("s") else v, spec))

    def fstring_spec(self, spec: ast.expr, env: dict[str, Any]) -> str:
        return "".join(self.fstring_part(q, env) for q in spec.values) if isinstance(spec, ast.JoinedStr) else ""


@dataclass(frozen=True)
class _Module:
    """What `import math` (or sympy) binds: a name whose attributes are looked up in that module's table only."""

    name: str
