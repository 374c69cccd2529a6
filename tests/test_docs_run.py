"""The docs check, part two: every command and Python snippet in README.md and docs/*.md is RUN, so a documented
command that parses but fails (a moved file, a renamed field, a benchmark that rotted) breaks `make test`.

They run as a newcomer would type them, on the CI machine's model and within a test's budget. The rewrites are
few, visible and the same for every command (`rewrite`, `snippet`):
- the reasoning model and placeholders (`qwen2.5-coder-1.5b`, `M`, `MODEL`, `my-model`) become the embedded 135M
  model, the only one `make test` prepares;
- budgets are capped: answers of 16 tokens, 1 rollout, 1 problem per eval run; benchmarks run with `--quick` and
  every cap they take (the same, and one turn and 4 clients), whether the command shows it or not;
- files land in a temporary folder, never in the checkout (eval records, the report, the viewer page, adapters);
- servers listen on a free loopback port, are probed, then stopped; the remote endpoints of the proxy example
  (`gpu-a`, `gpu-b`) become closed loopback ports: nothing here reaches another machine.
Two kinds of command are not run here, and the test says so by name: `make test` (it is the command running this
suite) and the install steps of "Install without make" (each is a step of the Makefile's `install`, which every
`make test` runs; `test_the_install_steps_are_the_makefiles` checks that they stay the same).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import httpx
import pytest
from servers import Process, free_port
from test_docs import ROOT, benchmark_help, blocks, commands

from fot.speculative import kernels

MODELS = {"qwen2.5-coder-1.5b": "default", "M": "default", "my-model": "default"}
CAPS = {  # answers and problems; then a benchmark's repetitions and load
    "--max-tokens": "16", "--new-tokens": "16", "--rollouts": "1", "--limit": "1", "--problems": "1",
    "--turns": "1", "--repeats": "1", "--clients": "4",
}  # fmt: skip
TIMEOUT = 600
CLOSED = "http://127.0.0.1:9/v1"  # the discard port: closed on loopback, so a request there is refused at once


def capped(*flags: str) -> list[str]:
    """The budget options a command does not show, at their caps."""
    return [w for flag in flags for w in (flag, CAPS[flag])]


def env() -> dict[str, str]:
    """This checkout's fot and evals, whatever the folder the command runs in."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}


def rewrite(argv: list[str]) -> list[str]:
    """The documented argv with the CI model, capped budgets and loopback endpoints (see the module docstring), in
    one spelling: `python -m evals.X` is `fot eval X`, and `--model default` is said by leaving it out, a
    benchmark runs with `--quick`."""
    if argv[:2] in (["python", "-m"], ["python3", "-m"]) and argv[2].startswith("evals.") and argv[2] != "evals.report":
        argv = ["fot", "eval", argv[2].removeprefix("evals."), *argv[3:]]
    if argv[:2] == ["fot", "prepare-model"]:
        argv = [*argv[:2], MODELS.get(argv[2], argv[2]), *argv[3:]]
    out: list[str] = []
    for i, word in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if flag == "--model" and word in MODELS:
            word = MODELS[word]
        elif flag in CAPS and word.isdigit():
            word = str(min(int(word), int(CAPS[flag])))
        elif flag == "--host":
            word = "127.0.0.1"
        elif flag == "--base-url":
            word = CLOSED  # nothing listens there
        out.append(word)
    if out[0] in ("python", "python3") and out[1].startswith("benchmarks/") and "--quick" not in out:
        out.append("--quick")
    while "--model" in out and out[out.index("--model") + 1] == "default":
        del out[out.index("--model") : out.index("--model") + 2]
    return out


def python(argv: list[str]) -> list[str]:
    """`fot ...` as this interpreter's `-m fot.cli`, `python ...` as this interpreter."""
    if argv[0] == "fot":
        return [sys.executable, "-m", "fot.cli", *argv[1:]]
    return [sys.executable, *argv[1:]] if argv[0] in ("python", "python3") else argv


def run(argv: list[str], cwd: Path, timeout: float = TIMEOUT) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ---- one runner per kind of command --------------------------------------------------------------------------------
def run_eval(argv: list[str], tmp: Path) -> None:
    """An eval run of one problem, its record written under tmp; `--data` files are made as the loaders read them."""
    data = option(argv, "--data")
    if data and data.endswith("/"):  # a MATH-500 folder
        (tmp / data).mkdir()
        (tmp / data / "test.jsonl").write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    elif data:  # a GSM8K file
        (tmp / data).write_text(json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    argv = [*argv, *capped("--limit", "--max-tokens", "--rollouts"), "--out", str(tmp / "out"), "--no-report"]
    run(python(argv), tmp)
    records = [json.loads(line) for f in (tmp / "out").rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(records) == 1 and records[0]["decision"], records
    native_cpu = option(argv, "--backend") in (None, "native") and option(argv, "--device") in (None, "cpu")
    assert records[0]["kernels"] == (kernels.running() if native_cpu else None)  # the build that made it


def run_report(argv: list[str], tmp: Path) -> None:
    """The report over a copy of the committed records: it writes REPORT.md and summary.json beside them."""
    results = argv[3] if len(argv) > 3 else "evals/results"
    shutil.copytree(ROOT / results, tmp / results)
    for made in ("REPORT.md", "summary.json"):
        (tmp / results / made).unlink(missing_ok=True)
    run(python(argv), tmp)
    assert (tmp / results / "REPORT.md").read_text().startswith("# Evaluation results")
    assert json.loads((tmp / results / "summary.json").read_text())


def serving(argv: list[str], tmp: Path) -> tuple[Process, str]:
    """`fot serve ...` on a free loopback port, its default search capped; ready when /metrics answers (/health
    answers 503 while an openai backend's endpoints do not)."""
    port = free_port()
    cmd = python([*argv, "--port", str(port), *capped("--max-tokens", "--rollouts")])
    server = Process(cmd, tmp / "serve.log", env())
    server.wait_ready(f"http://127.0.0.1:{port}/metrics", timeout=180)
    return server, f"http://127.0.0.1:{port}"


def run_serve(argv: list[str], tmp: Path) -> None:
    key = "docs-key" if "$KEY" in argv else None
    argv = [key if w == "$KEY" else w for w in argv]
    server, url = serving(argv, tmp)
    with server:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert models.status_code == 200 and any(m["id"] == "fot-4" for m in models.json()["data"]), models.text
        health = httpx.get(f"{url}/health", headers=headers, timeout=30)  # its cause is shown with a key
        if option(argv, "--backend") == "openai":  # its endpoints are rewritten to a closed port
            assert health.status_code == 503 and "no endpoint answered" in health.json()["error"], health.text
        else:
            assert health.status_code == 200, health.text
        if key:
            assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401


def run_curl(argv: list[str], tmp: Path) -> None:
    """The curl example against a `fot serve` started for it (the embedded model)."""
    server, url = serving(["fot", "serve"], tmp)
    with server:
        out = run([re.sub(r"http://127\.0\.0\.1:8000", url, w) for w in argv], tmp)
        reply = json.loads(out)
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["total_tokens"] > 0, reply


def run_vllm_serve(argv: list[str], tmp: Path) -> None:
    """`vllm serve MODEL --speculative-config {Kangaroo}` on the embedded model (with its shipped adapter): it
    starts, and a completion comes back."""
    from fot.models import resolve_model

    port = free_port()
    spec = option(argv, "--speculative-config")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model("default"))]
    cmd += ["--speculative-config", spec, "--served-model-name", "docs", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
    with Process(cmd, tmp / "vllm.log", env()) as server:
        server.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=300)
        body = {"model": "docs", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"], reply.text


def run_benchmark(argv: list[str], tmp: Path) -> None:
    """A benchmark with `--quick` and every cap it takes (16-token answers, one turn, 4 clients of the server...):
    it finishes, and its last line is one JSON object."""
    # `rewrite` capped those the command gives; the others are added at their caps
    caps = [w for opt, n in CAPS.items() if opt in benchmark_help(argv[1]) and opt not in argv for w in (opt, n)]
    out = run(python([*argv, *caps]), ROOT)
    last = out.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last


def run_command(argv: list[str], tmp: Path) -> None:
    head, sub = argv[0], argv[1] if len(argv) > 1 else ""
    if head == "make" and argv[1:] == ["demo"]:
        out = run(["make", "demo", "DEMO_MODEL=default"], ROOT)
        assert "answer" in out, out[-2000:]
    elif head == "fot" and sub == "eval":
        run_eval(argv, tmp)
    elif head.startswith("python") and sub == "-m":
        run_report(argv, tmp)
    elif head.startswith("python") and sub.startswith("benchmarks/"):
        run_benchmark(argv, tmp)
    elif head == "fot" and sub == "serve":
        run_serve(argv, tmp)
    elif head == "fot" and sub == "solve":
        out = run(python([*argv, *capped("--max-tokens")]), tmp)
        assert "answer" in out, out
        page = option(argv, "--html")
        assert page is None or "<html" in (tmp / page).read_text().lower()
    elif head == "fot" and sub == "generate":
        assert run(python([*argv, "--max-tokens", "8"]), tmp).strip()
    elif head == "fot" and sub == "train-adapter":
        out = tmp / "adapter"
        run(python([*argv, "--prompts", "10", "--epochs", "1", *capped("--new-tokens"), "--out", str(out)]), tmp)
        assert (out / "adapter.safetensors").is_file() and (out / "adapter_config.json").is_file()
    elif head == "fot" and sub == "prepare-model":
        assert Path(run(python(argv), tmp).strip().splitlines()[-1]).is_dir()
    elif head == "curl":
        run_curl(argv, tmp)
    elif head == "vllm":
        run_vllm_serve(argv, tmp)
    else:
        raise AssertionError(f"the docs run does not know how to run {argv}")


def not_run(argv: list[str]) -> str | None:
    """Why a documented command is not run here, or None: only `make test` and the install steps."""
    if argv == ["make", "test"]:
        return "it is the command that runs this suite"
    if argv[0] in ("pip", ".", "source") or argv[1:3] == ["-m", "venv"]:
        return "an install step: the Makefile's `install` runs it (test_the_install_steps_are_the_makefiles)"
    return None


def runs() -> dict[tuple[str, ...], list[str]]:
    """Each distinct command as it runs here (after `rewrite`), with the places the docs show it."""
    out: dict[tuple[str, ...], list[str]] = {}
    for where, argv in commands():
        if not_run(argv) is None:
            out.setdefault(tuple(rewrite(argv)), []).append(where)
    return out


@pytest.mark.parametrize("argv", list(runs()), ids=lambda a: " ".join(a)[:70])
def test_every_documented_command_runs(argv: tuple[str, ...], tmp_path: Path) -> None:
    try:
        run_command(list(argv), tmp_path)
    except (AssertionError, subprocess.TimeoutExpired, RuntimeError, TimeoutError) as e:
        pytest.fail(f"{', '.join(runs()[argv])}: {' '.join(argv)!r} failed: {e}")


def test_only_make_test_and_the_install_steps_are_not_run() -> None:
    skipped = {" ".join(argv): not_run(argv) for _, argv in commands() if not_run(argv)}
    assert skipped.pop("make test") is not None
    assert all(why.startswith("an install step") for why in skipped.values()), skipped
    assert {w.split()[0] for w in skipped} <= {"pip", "python3", "."}, skipped
    assert len(runs()) >= 20, "the docs run finds the documented commands"


def test_the_install_steps_are_the_makefiles() -> None:
    """Each pip step of "Install without make" is a step of the Makefile's install recipe (same packages, same
    extras, same pins), so `make test`'s own install runs what the README tells a newcomer to type."""
    makefile = (ROOT / "Makefile").read_text()
    steps = [argv for _, argv in commands() if argv[0] == "pip"]
    assert steps, "the README shows the install steps"
    for argv in steps:
        words = [w for w in argv[1:] if not w.startswith("-") or w == "-e"]
        action, wanted = words[0], words[1:]
        if wanted[:1] == ["-e"]:
            extras = set(re.fullmatch(r"\.\[([\w,-]+)\]", wanted[1]).group(1).split(","))
            made = set(re.search(r"pip install --quiet -e '\.\[([\w,-]+)\]'", makefile).group(1).split(","))
            assert extras <= made, f"the README installs {extras}, the Makefile {made}"
        else:
            line = next((ln for ln in makefile.splitlines() if f"pip {action} " in ln and wanted[0] in ln), "")
            assert all(w in line.split() for w in wanted), f"`pip {action} {' '.join(wanted)}` is not the Makefile's"


# ---- the Python snippets ---------------------------------------------------------------------------------------------
def snippet(code: str, url: str | None) -> str:
    """A snippet as it runs here: the CI model for the reasoning model, the docs server's URL for port 8000, the
    embedded model's shipped adapter for the placeholder folder."""
    from fot.speculative.kangaroo import SHIPPED

    code = code.replace('"qwen2.5-coder-1.5b"', '"default"').replace(
        '"my/adapter"', repr(str(SHIPPED / "smollm2-135m"))
    )
    return code.replace("http://127.0.0.1:8000", url) if url else code


@cache
def snippets() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for where, code in blocks({"python"}):
        out.setdefault(textwrap.dedent(code), []).append(where)
    return out


@pytest.mark.parametrize("code", list(snippets()), ids=lambda c: snippets()[c][0])
def test_every_documented_snippet_runs(code: str, tmp_path: Path) -> None:
    """Each distinct snippet runs as shown, in a fresh interpreter; a client snippet talks to a `fot serve` started
    for it."""
    server, url = serving(["fot", "serve"], tmp_path) if "127.0.0.1:8000" in code else (None, None)
    try:
        (tmp_path / "snippet.py").write_text(snippet(code, url))
        run([sys.executable, "snippet.py"], tmp_path)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"{', '.join(snippets()[code])}: the snippet failed: {e}")
    finally:
        if server is not None:
            server.stop()
