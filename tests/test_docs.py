"""The docs check: every command and snippet in README.md and docs/*.md is checked against the code it names, so a
renamed option, a removed choice or a moved function breaks `make test`, not a newcomer's first try.

- `fot ...`, `fot eval ...`, `python -m evals.X ...`: parsed by the real argument parsers (nothing runs);
- `python benchmarks/X.py ...` (fenced or inline): the script exists and its `--help` lists every option used;
- `make T`: T is a Makefile target; `pip install -e '.[...]'`: each extra is in pyproject.toml;
- `vllm serve ... --speculative-config JSON` and `curl ... -d JSON`: the JSON parses, and names a class that
  exists / is a valid chat request for `fot serve`;
- Python blocks: they compile, and every `from X import Y` / `import X` / `X.attr` of a project module resolves.
This part reads; `tests/test_docs_run.py` runs every command and snippet as well (on the embedded model, with
capped budgets).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def blocks(lang: set[str]) -> list[tuple[str, str]]:
    """(where, text) of every fenced block in one of the languages."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) in lang:
                line = text[: m.start()].count("\n") + 1
                out.append((f"{path.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def commands() -> list[tuple[str, list[str]]]:
    """Every shell command of the bash blocks (lines joined at a trailing backslash, split at `&&`), as argv, and
    every inline `python benchmarks/...` span."""
    out = []
    for where, text in blocks({"bash", "sh"}):
        pending = ""
        for line in re.sub(r"\\\n", " ", text).splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quoted argument over several lines (curl -d '{...}'): read on
                continue
            pending = ""
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append((where, words[:cut]))
                words = words[cut + 1 :]
    for path in DOCS:
        for m in re.finditer(r"`(python benchmarks/[^`]+)`", path.read_text()):
            out.append((f"{path.relative_to(ROOT)} (inline)", shlex.split(m.group(1))))
    return out


def parse(parser, argv: list[str], where: str) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {shlex.join(argv)!r} does not parse (exit {e.code})")


@cache
def benchmark_help(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's fot, whatever is installed
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"{script} --help failed: {out.stderr[-1000:]}"
    return out.stdout


def check_command(where: str, argv: list[str]) -> None:
    from evals.runner import BENCHMARKS
    from evals.runner import parser as eval_parser
    from fot.cli import build_parser

    head, rest = argv[0], argv[1:]
    if head == "fot":
        parse(
            eval_parser() if rest[:1] == ["eval"] else build_parser(), rest[1:] if rest[:1] == ["eval"] else rest, where
        )
    elif head in ("python", "python3") and rest[:1] == ["-m"] and rest[1].startswith("evals."):
        name = rest[1].removeprefix("evals.")
        if name == "report":
            assert len(rest) <= 3 and (ROOT / (rest[2] if len(rest) == 3 else "evals/results")).is_dir(), where
        else:
            assert name in BENCHMARKS, f"{where}: no benchmark {name!r}"
            parse(eval_parser(name), rest[2:], where)
    elif head in ("python", "python3") and rest and rest[0].startswith("benchmarks/"):
        assert (ROOT / rest[0]).is_file(), f"{where}: {rest[0]} does not exist"
        for option in (w.split("=")[0] for w in rest[1:] if w.startswith("--")):
            assert option in benchmark_help(rest[0]), f"{where}: {rest[0]} has no option {option}"
    elif head == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
        assert all(t in targets or "=" in t for t in rest), f"{where}: make {rest} (targets: {sorted(targets)})"
    elif head == "pip" and rest[:2] == ["install", "-e"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        wanted = re.fullmatch(r"\.\[([\w,-]+)\]", rest[2])
        assert wanted and set(wanted.group(1).split(",")) <= extras, f"{where}: extras {rest[2]} (have {extras})"
    elif head == "vllm":
        config = json.loads(rest[rest.index("--speculative-config") + 1])
        module, _, name = config["model"].rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{where}: no {config['model']}"
    elif head == "curl":
        from fot.chat import ChatRequest

        ChatRequest.model_validate(json.loads(rest[rest.index("-d") + 1]))
    else:  # set-up steps that only install things: pip (un)install of named packages, venv, activate
        assert head in ("pip", "python3", ".", "source"), f"{where}: the docs check does not know {shlex.join(argv)!r}"


@pytest.mark.parametrize(("where", "argv"), commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_every_documented_command_is_valid(where: str, argv: list[str]) -> None:
    check_command(where, argv)


def project_modules(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name or None) for every import of a project module (fot, evals) in a snippet."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("fot", "evals"):
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] in ("fot", "evals")]
    return found


@pytest.mark.parametrize(("where", "code"), blocks({"python"}), ids=lambda x: x if ":" in x else "")
def test_every_python_snippet_compiles_and_names_what_exists(where: str, code: str) -> None:
    tree = ast.parse(code, where)
    for module, name in project_modules(tree):
        m = importlib.import_module(module)
        assert name is None or hasattr(m, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{where}: {module} has no {name}"
        )
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for node in ast.walk(tree):  # fot.solve, fot.ForestConfig, ...: attributes of an imported project module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
            if node.value.id in ("fot", "evals"):
                assert hasattr(importlib.import_module(node.value.id), node.attr), (
                    f"{where}: no {node.value.id}.{node.attr}"
                )


def test_the_docs_check_finds_the_documented_commands() -> None:
    """It checks something: the README's commands and snippets are found, and a wrong option fails."""
    heads = {argv[0] for _, argv in commands()}
    assert {"make", "fot", "python"} <= heads and len(blocks({"python"})) >= 5
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command("here", ["fot", "solve", "x", "--no-such-option"])
    with pytest.raises(AssertionError, match="has no option"):
        check_command("here", ["python", "benchmarks/kangaroo.py", "--no-such-option"])
