"""`fot` command line: solve, serve, eval, demo, generate, train-adapter, prepare-model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from fot.errors import FotError
from fot.models import configure_caches
from fot.options import (
    add_backend_options,
    add_budget_options,
    add_math_options,
    add_method_options,
    check_cli_backend,
    make_cli_backend,
    search_config,
)

DEMO_MODEL = "qwen2.5-coder-1.5b"  # the reasoning model; `--model default` is the fast embedded 135M one
DEMO_PROBLEMS = [
    "A baker puts cookies on trays. Each tray holds 39 cookies. She has 241 cookies and 6 trays. How many cookies "
    "do not fit on the trays?",
    "1 2 3 13",
]


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from fot.models import resolve_model

    print(resolve_model(args.model))


def generate_and_print(
    model: str, questions: list[str], max_tokens: int, as_json: bool, speculative: str | None = None
) -> None:
    from fot.config import SamplingParams
    from fot.speculative.engine import Engine

    params = SamplingParams.make(None, max_tokens=max_tokens)  # a bad value fails before the model loads
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model, speculative=speculative)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = engine.generate([[{"role": "user", "content": q}] for q in questions], params)
    seconds = time.perf_counter() - t0
    tokens = sum(o.generated_tokens for o in outs)
    if as_json:
        print(json.dumps([o.model_dump() for o in outs]))
        return
    for q, o in zip(questions, outs, strict=True):
        print(f"\n>>> {q}\n{o.text.strip()}\n    [{o.generated_tokens} tokens, {o.finish_reason}]")
    print(
        f"\n{len(questions)} prompts in one batch: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s "
        f"(model load {load:.1f} s, dtype {engine.model.dtype}, {engine.stats.forward_passes} forward passes)"
    )
    if speculative:
        s = engine.stats
        print(
            f"{speculative}: {s.accepted_tokens}/{s.draft_tokens} drafts accepted, accept length {s.accept_length:.2f}"
        )


def cmd_generate(args: argparse.Namespace) -> None:
    generate_and_print(args.model, args.prompt, args.max_tokens, args.json, args.speculative)


def cmd_train_adapter(args: argparse.Namespace) -> None:
    from fot.speculative.adapter_training import train_adapter

    names = ("exit_layer", "prompts", "new_tokens", "epochs", "batch_size", "lr", "seed", "dtype")
    options = {name: getattr(args, name) for name in names}
    if args.prompt_set == "search":
        from fot.trees.workload import search_prompts

        options["prompt_set"] = search_prompts
    out = train_adapter(
        args.model, args.out, draft_vocab=args.draft_vocab or None, resume=not args.no_resume, **options
    )
    print(f"adapter written to {out}")
    print((out / "adapter_config.json").read_text().split('"draft_vocab"')[0] + "...")


def check_writable(path: Path) -> None:
    """A file the command will write at its end, checked before its work: not found out after minutes of search."""
    if path.is_dir() or not path.parent.is_dir():
        raise FotError(f"cannot write {path}: {'it is a folder' if path.is_dir() else 'no folder ' + str(path.parent)}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise FotError(f"cannot write {path}: permission denied")


def solve_and_print(problems: list[str], args: argparse.Namespace) -> None:
    from fot.decoding.base import run_sync
    from fot.forest import asolve_many, check_problem

    options = dict(task=args.task, trees=args.trees, method=args.method, config=search_config(args), seed=args.seed)
    for problem in problems:  # bad input fails before a model loads
        check_problem(problem, options)
    html = getattr(args, "html", None)
    if html:
        check_writable(Path(html))
    backend = options["backend"] = make_cli_backend(args)
    t0 = time.perf_counter()
    solutions, failed = run_sync(asolve_many(problems, return_exceptions=True, **options)), 0
    for problem, sol in zip(problems, solutions, strict=True):
        if isinstance(sol, FotError):  # a failed search is reported, never printed as an answer
            failed += 1
            print(f"\n>>> {problem}\nfailed: {sol}", file=sys.stderr)
            if args.json:  # one line per problem, in order: an error object in its place
                print(json.dumps({"problem": problem, "error": f"{type(sol).__name__}: {sol}"}))
            continue
        if isinstance(sol, BaseException):
            raise sol
        if args.json:
            print(sol.model_dump_json())
            continue
        u = sol.usage
        print(f"\n>>> {sol.problem}")
        print(f"answer: {sol.answer}   ({sol.task}, {sol.method}, decided by {sol.decision}, votes {sol.votes})")
        print(
            f"    trees' answers {sol.tree_answers}; {u.requests} requests, {u.generated_tokens} tokens generated, "
            f"{u.backend_calls} batches, {u.tokens_saved} tokens saved by sparse activation, "
            f"{u.corrections} self-corrections, {u.seconds:.1f} s"
        )
        if sol.task == "math":
            print(
                f"    rule checks: {u.code_checks} code blocks run ({u.code_skipped} more not judged), "
                f"{u.code_repairs} made-up outputs repaired; "
                f"{u.arithmetic_checks} statements recomputed, {u.arithmetic_repairs} repaired"
            )
        for r in sol.repairs:
            if r.kind == "code":
                print(f"    repaired: a code block prints {r.actual!r}, the answer claimed {r.claimed!r}")
            else:
                print(f"    repaired ({r.kind}): {' '.join(r.source.split())[:60]} = {r.actual}, not {r.claimed}")
        if sol.task == "game24":  # ToT's repairs: steps whose result was recomputed
            steps = [(n["corrected_from"], n["step"]) for t in sol.trees for n in t["nodes"] if "corrected_from" in n]
            for wrote, fixed in steps[:3]:
                print(f"    step recomputed: {wrote!r} -> {fixed!r}")
            if len(steps) > 3:
                print(f"    ... and {len(steps) - 3} more steps recomputed")
    if not args.json:
        b = backend.usage
        accepted = f", {b.accepted_tokens}/{b.draft_tokens} drafts accepted" if b.draft_tokens else ""
        print(f"\nbackend {backend.name}: {b.requests} requests, {b.forward_passes} forward passes{accepted}")
        print(f"wall time {time.perf_counter() - t0:.0f} s for {len(problems)} problems (solved together)")
    if html:
        from fot.viewer import page

        found = [s.model_dump() for s in solutions if not isinstance(s, BaseException)]
        try:
            Path(html).write_text(page(found), "utf-8")
        except OSError as e:
            raise FotError(f"cannot write the forest viewer to {html}: {e}") from None
        print(f"forest viewer written to {html}", file=sys.stderr)
    if failed:
        raise FotError(f"{failed} of {len(problems)} searches failed (see above)")


def cmd_solve(args: argparse.Namespace) -> None:
    solve_and_print(args.problem, args)


def cmd_demo(args: argparse.Namespace) -> None:
    if args.model is None:  # an OpenAI-compatible server's own model, else the reasoning model
        args.model = "default" if args.backend == "openai" else DEMO_MODEL
    where = {"native": "native engine, EMS-SD prompt lookup", "vllm": "vLLM", "openai": "OpenAI-compatible server"}
    print(f"fot demo: Forest-of-Thought with {args.trees} trees on {args.model} ({where[args.backend]})")
    solve_and_print(DEMO_PROBLEMS, args)


def add_search_options(p: argparse.ArgumentParser, rollouts: int = 4, max_tokens: int = 384) -> None:
    p.add_argument("--task", default="auto", choices=["auto", "math", "game24"])
    add_method_options(p)
    add_math_options(p)
    add_budget_options(p, rollouts, max_tokens)
    add_backend_options(p)


async def connected(backend) -> None:
    """Ask an OpenAI backend's endpoints what they serve, then close this loop's connections (the server's loop
    opens its own)."""
    try:
        await backend.connect()
    finally:
        await backend.close()


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from fot.decoding import BackendError
    from fot.forest import make_config
    from fot.server import ServeConfig, listen, serve

    env = os.environ.get("FOT_API_KEYS")
    keys = list(args.api_key or []) + (env.split(",") if env is not None else [])  # a blank one is refused below
    try:
        config = ServeConfig(
            api_keys=[k.strip() for k in keys],
            max_running=args.max_running,
            max_queue=args.max_queue,
            deadline=args.deadline,
            search=search_config(args) | {"trees": args.trees},
        )
        make_config(config.search)  # bad defaults fail before a model loads
    except ValueError as e:
        raise FotError(f"invalid server option: {e}") from None
    check_cli_backend(args)
    sock = listen(args.host, args.port)
    backend = make_cli_backend(args)
    if hasattr(backend, "connect"):  # an upstream that does not serve --model is an error now
        try:
            asyncio.run(connected(backend))
        except BackendError as e:  # down now, perhaps up later: until then its searches get 503
            print(f"fot serve: warning: {e}", file=sys.stderr)
    serve(backend, config, sock)


def cmd_eval(args: argparse.Namespace) -> None:
    """The evaluations live in the checkout beside fot/ (evals/), not in an installed package of that name."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "evals" / "runner.py").exists():
        raise FotError(f"`fot eval` runs the evaluations of a checkout of the repository; {root} has no evals/")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from evals.runner import main as eval_main
    except ImportError as e:
        raise FotError(f"`fot eval` needs the evals extra (`pip install 'fot[eval]'`): {e}") from None
    eval_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-model", help="fetch and convert a known model into the cache; print its folder")
    p.add_argument("model", nargs="?", default="default")
    p.set_defaults(func=cmd_prepare_model)
    p = sub.add_parser("generate", help="answer chat prompts in one batch")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--model", default="default")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the completions as JSON")
    p.add_argument("--speculative", choices=["prompt_lookup"], help="EMS-SD speculative decoding with these drafts")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("solve", help="solve problems with Forest-of-Thought (math or Game of 24, detected)")
    p.add_argument("problem", nargs="+")
    add_search_options(p)
    p.add_argument("--json", action="store_true", help="print each Solution as one JSON line")
    p.add_argument("--html", metavar="FILE", help="write the forest viewer (one HTML page, works offline) to FILE")
    p.set_defaults(func=cmd_solve)
    # `fot eval ...` goes straight to the evals parser (in main), so its -h and options are the evals' own.
    sub.add_parser("eval", help="run a benchmark (gsm8k, math, game24, arithmetic, gsm_symbolic); see `fot eval -h`")
    p = sub.add_parser("demo", help=f"solve a math problem and a Game-of-24 puzzle on {DEMO_MODEL}")
    add_search_options(p, rollouts=1, max_tokens=320)
    p.set_defaults(func=cmd_demo, json=False, model=None)
    p = sub.add_parser("serve", help="serve Forest-of-Thought behind an OpenAI-compatible endpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", help="a key clients must send (repeat for several; or FOT_API_KEYS)")
    p.add_argument("--max-running", type=int, default=16, help="searches at once (they share the backend's batches)")
    p.add_argument("--max-queue", type=int, default=64, help="searches waiting; beyond that clients get 429")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds per request, waiting included")
    add_budget_options(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("train-adapter", help="distil a Kangaroo adapter for a model from its own generations")
    p.add_argument("--model", default="default")
    p.add_argument("--out", help="output folder (default: the project cache)")
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--prompts", type=int, default=160)
    p.add_argument(
        "--prompt-set", default="search", choices=["search", "simple"],
        help="search: the search's own prompts (answers, critiques, refines, grades, Game of 24) over made-up "
        "problems; simple: one word-problem template (the shipped 135M adapter's data)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", help="the teacher's, which also generates the data (float32, fast)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft head over the N most frequent tokens; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming from the checkpoint")
    p.set_defaults(func=cmd_train_adapter)
    return parser


def main(argv: list[str] | None = None) -> None:
    configure_caches()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # the evals parser takes the rest, its -h included
        args = argparse.Namespace(func=cmd_eval, args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        args.func(args)
    except FotError as e:
        print(f"fot: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
