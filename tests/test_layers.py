"""The import layering, read with `ast` from the source (imports inside functions count too): a module imports only
modules of its own layer or of layers below it, and no two modules import each other, directly or round a circle.

Bottom to top:
  base      fot.errors, fot.files, fot.config, fot.models, fot.data, fot.viewer (renders data, knows no search)
  tasks     fot.tasks.*: problems, answers, rule checks, the safe interpreter
  engine    fot.speculative.*: the model, the per-sample cache, drafters, the generate loop
  backends  fot.decoding.*: native, vLLM, OpenAI-compatible servers behind one contract
  trees     fot.trees.*: MCTSr, ToT, chain of thought
  search    fot.augment, fot.correction, fot.consensus, fot.forest: input augmentation, self-correction, the
            decision, the forest and its sparse activation
  fronts    fot.chat, fot.server, fot.options: the chat-completions format, the HTTP endpoint, the options and
            backend factory of the command lines
  evals     evals.*
  cli       fot.cli (`fot eval` hands its arguments to the evals)
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("base", ["fot.errors", "fot.files", "fot.config", "fot.models", "fot.data", "fot.viewer"]),
    ("tasks", ["fot.tasks"]),
    ("engine", ["fot.speculative"]),
    ("backends", ["fot.decoding"]),
    ("trees", ["fot.trees"]),
    ("search", ["fot.augment", "fot.correction", "fot.consensus", "fot.forest"]),
    ("fronts", ["fot.chat", "fot.server", "fot.options"]),
    ("evals", ["evals"]),
    ("cli", ["fot.cli"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for package in ("fot", "evals"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] != "__init__":  # a package's __init__ re-exports its children: not a layer of its own
                out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a package named resolves to its __init__, which is skipped)."""
    found = set()
    package = name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
                break
    return found


def graph() -> dict[str, set[str]]:
    files = modules()
    return {m: imports(p, m, set(files)) for m, p in files.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
        for m, targets in sorted(g.items())
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]


def circles(g: dict[str, set[str]]) -> list[str]:
    found, state = [], {}  # state 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                found.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def test_no_module_imports_a_layer_above_its_own():
    assert upward(graph()) == []


def test_there_are_no_import_circles():
    assert circles(graph()) == []


def test_the_checks_see_an_upward_import_and_the_circle_it_makes(tmp_path, monkeypatch):
    """A layer-breaking import added to a copy of the tree is caught by both checks."""
    for package in ("fot", "evals"):
        shutil.copytree(ROOT / package, tmp_path / package)
    errors = tmp_path / "fot" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from fot.forest import asolve  # noqa\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    g = graph()
    assert upward(g) == ["fot.errors (base) imports fot.forest (search)"]
    assert any({"fot.errors", "fot.forest"} <= set(c.split(" -> ")) for c in circles(g))
