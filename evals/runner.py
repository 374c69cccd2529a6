"""One runner for every benchmark: solve each problem, score it after the search, append one JSON line per problem.

    python -m evals.game24 --method fot --trees 4 --limit 20
    fot eval arithmetic --method sc --trees 8 --concurrency 8

Each run writes OUT/BENCHMARK/RUN.jsonl, where RUN names the settings (method, trees, drafter, seed and a hash of
the rest). A record is appended, flushed and fsynced the moment its problem finishes, so re-running the same
command skips the finished problems and a crash loses only the problems in flight (`--concurrency`, default 1).
The search gets the question only; `gold` is read after it returns, to score the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from evals.data import (
    TASK_OF,
    DataError,
    Problem,
    gym_score,
    load_arithmetic,
    load_game24,
    load_gsm8k,
    load_gsm_symbolic,
    load_math500,
    score,
)
from evals.records import Record, append, check_records, read_records, writer_lock
from fot.errors import FotError
from fot.models import configure_caches
from fot.options import (
    DEFAULT_DRAFTER,
    DRAFTERS,
    RULE_CHECKS,
    add_backend_options,
    add_budget_options,
    add_math_options,
    add_method_options,
    check_cli_backend,
    checks_on,
    make_cli_backend,
    search_config,
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    load: Callable[[argparse.Namespace], list[Problem]]


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--levels must be comma-separated integers, got {text!r}") from None


LOADERS: dict[str, Callable[[argparse.Namespace], list[Problem]]] = {
    "gsm8k": lambda a: load_gsm8k(a.data),
    "math": lambda a: load_math500(a.data),
    "game24": lambda a: load_game24(a.data, a.ranks),
    "arithmetic": lambda a: load_arithmetic(a.n, _levels(a.levels), a.data_seed),
    "gsm_symbolic": lambda a: load_gsm_symbolic(a.n, a.data_seed),
}
BENCHMARKS = {name: Benchmark(name, TASK_OF[name], load) for name, load in LOADERS.items()}


def data_digest(problems: list[Problem]) -> str:
    """What identifies a run's data: a hash of its problems' ids, questions and gold answers."""
    rows = [[p.id, p.question, p.gold] for p in problems]
    return hashlib.sha1(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:12]


def rule_checks(args: argparse.Namespace) -> dict[str, bool]:
    """Which rule checks this run's search runs (math benchmarks only)."""
    return {name: on and args.benchmark != "game24" for name, on in checks_on(args).items()}


def program_trees(args: argparse.Namespace) -> int:
    """How many of this run's trees answer with a program (fot on math only)."""
    return (getattr(args, "program_trees", None) or 0) if args.method == "fot" and args.benchmark != "game24" else 0


def fallback_samples(args: argparse.Namespace) -> int:
    """The chains of thought that break this run's ties (fot only; 1: the paper's one greedy chain)."""
    return getattr(args, "fallback_samples", None) or 1


def drafter(args: argparse.Namespace) -> str:
    """The --speculative a run uses: as given, else the backend's default. Its backend is built with it and its
    records name it, so the two are one."""
    return args.speculative or DEFAULT_DRAFTER[args.backend]


def run_name(args: argparse.Namespace, problems: list[Problem] | None = None) -> str:
    """The file name of a run: readable settings plus a hash of everything else that changes results. With
    `--data`, the data's own hash (`data_digest` of `problems`) is part of it: another file is another run."""
    settings = {k: getattr(args, k) for k in ("model", "backend", "rollouts", "max_tokens", "base_url", "ranks")}
    if getattr(args, "data", None) and problems is not None:
        settings["data"] = data_digest(problems)
    if args.device != "cpu":  # device and dtype named only when set, so that older runs keep their names
        settings["device"] = args.device
    if args.device == "cpu" and args.backend == "native":  # named by what it resolves to
        import torch

        from fot.speculative.kernels import resolve_dtype

        if resolve_dtype(args.dtype, "cpu") == torch.bfloat16:  # fp32 is unnamed, as the "auto" of earlier runs
            settings["dtype"] = "fast"  # the name the committed bf16 runs have
    elif args.dtype != "auto":
        settings["dtype"] = args.dtype
    if args.benchmark == "arithmetic":
        settings |= {"n": args.n, "levels": args.levels, "data_seed": args.data_seed}
    if args.benchmark == "gsm_symbolic":
        settings |= {"n": args.n, "data_seed": args.data_seed}
    if program_trees(args):
        settings["program_trees"] = program_trees(args)
    if fallback_samples(args) > 1:  # the runs before the option keep their names
        settings["fallback_samples"] = fallback_samples(args)
    if args.method == "fot" and args.benchmark != "game24":  # math: the fallback runs the corrector (older runs: not)
        settings["fallback"] = "corrected"
    from fot.forest import SEARCH_VERSIONS

    version = SEARCH_VERSIONS[BENCHMARKS[args.benchmark].task]
    if version > 1:  # the runs of version 1 keep their names
        settings["search"] = version
    for name, on in rule_checks(args).items():  # runs from before a check keep their names
        if on:
            settings[f"{name}_checks"] = True
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(args.model).name if args.model else "default"
    return f"{args.method}-t{args.trees}-{model}-{args.backend}-{drafter(args)}-s{args.seed}-{digest}"


def kernels_of(backend) -> str | None:
    """The build of our CPU kernels that runs `backend`'s model (`kernels.running()`; None for any other)."""
    engine = getattr(backend, "engine", None) if backend.name == "native" else None
    if engine is None:
        return None
    from fot.speculative import kernels
    from fot.speculative.model import kernels_for

    return kernels.running() if kernels_for(engine.model.dtype, engine.device) is not None else None


async def solve_all(
    problems: list[Problem], args: argparse.Namespace, path: Path, backend, total: int
) -> tuple[int, int]:
    """Solve `problems` (the unfinished ones of the `total` the run was asked for) with at most `args.concurrency`
    in flight; append each record as it finishes."""
    from fot.forest import SEARCH_VERSIONS, Solution, asolve

    config, checks = search_config(args), rule_checks(args)
    engine_kernels = kernels_of(backend)
    gate = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=len(problems), desc=f"{args.benchmark} {args.method} x{args.trees}", unit="problem")
    right = failed = 0

    async def one(problem: Problem) -> None:
        nonlocal right, failed
        async with gate:
            try:
                sol = await asolve(
                    problem.question,
                    task=problem.task,
                    trees=args.trees,
                    method=args.method,
                    backend=backend,
                    config=config,
                    seed=args.seed,
                )
                # scoring can fail too (math-verify that keeps dying), and can take seconds: off the event loop,
                # where the other problems in flight go on
                record = await asyncio.to_thread(make_record, problem, sol)
            except FotError as e:  # one problem's failure is reported, not recorded: a re-run retries it
                failed += 1
                tqdm.write(f"evals: {problem.id} failed: {e}", file=sys.stderr)
                bar.update()
                return
        append(path, record)
        right += record.correct
        bar.update()
        bar.set_postfix(acc=f"{right / max(bar.n - failed, 1):.1%}")

    def make_record(problem: Problem, sol: Solution) -> Record:
        u = sol.usage
        return Record(
            id=problem.id,
            benchmark=args.benchmark,
            run=path.stem,
            method=args.method,
            trees=args.trees,
            model=args.model,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            speculative=drafter(args),
            seed=args.seed,
            level=problem.level,
            answer=sol.answer,
            gold=problem.gold,
            correct=score(problem, sol.answer),
            votes=sol.votes,
            decision=sol.decision,
            tokens=u.generated_tokens,
            prompt_tokens=u.prompt_tokens,
            requests=u.requests,
            forward_passes=u.forward_passes,
            draft_tokens=u.draft_tokens,
            accepted_tokens=u.accepted_tokens,
            tokens_saved=u.tokens_saved,
            corrections=u.corrections,
            code_checks_on=checks["code"],
            code_checks=u.code_checks,
            code_repairs=u.code_repairs,
            arithmetic_checks_on=checks["arithmetic"],
            arithmetic_checks=u.arithmetic_checks,
            arithmetic_repairs=u.arithmetic_repairs,
            program_trees=program_trees(args),
            fallback_samples=fallback_samples(args),
            max_tokens=args.max_tokens,
            rollouts=args.rollouts if args.method in ("fot", "mctsr") and problem.task == "math" else None,  # MCTSr
            search_version=SEARCH_VERSIONS[problem.task],
            gym_correct=gym_score(problem, sol.answer),
            tree_answers=sol.tree_answers,
            tree_correct=[score(problem, a) for a in sol.tree_answers],
            node_answers=[[n["answer"] for n in t["nodes"] if n.get("answer") is not None] for t in sol.trees],
            seconds=round(u.seconds, 3),
            concurrency=args.concurrency,
            kernels=engine_kernels,
            total=total,
        )

    try:
        async with asyncio.TaskGroup() as group:  # an unexpected error stops the other problems in flight too
            for p in problems:
                group.create_task(one(p))
    except BaseExceptionGroup as e:
        raise e.exceptions[0] from None
    finally:
        bar.close()
    return right, failed


def parser(benchmark: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m evals.{benchmark}" if benchmark else "fot eval",
        description="Run a benchmark; results are appended to OUT/BENCHMARK/RUN.jsonl and re-runs resume.",
    )
    if benchmark is None:
        p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    add_method_options(p)
    add_budget_options(p)
    add_backend_options(p)
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--out", default="evals/results", help="results folder")
    p.add_argument("--data", help="local data file or folder (jsonl/json/parquet; Game of 24: the 24.csv)")
    add_math_options(p)
    p.add_argument(
        "--speculative",
        help="native: none|prompt_lookup|kangaroo|hybrid (default prompt_lookup); vllm: none|ngram|kangaroo "
        "(default none); openai: none",
    )
    p.add_argument("--concurrency", type=int, default=1, help="problems in flight (their steps share batches)")
    p.add_argument("--max-batch", type=int, default=64, help="the backend's batch size limit")
    p.add_argument("--device", default="cpu", help="native backend: the torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="native backend: auto (bf16 where our CPU kernels run, else fp32), fast, float32, bfloat16",
    )
    p.add_argument("--ranks", default="901-1000", help="Game of 24: puzzle ranks")
    p.add_argument("--n", type=int, default=100, help="arithmetic, gsm_symbolic: problems generated")
    p.add_argument("--levels", default="1,2,3,4", help="arithmetic: operations per problem")
    p.add_argument("--data-seed", type=int, default=0, help="arithmetic, gsm_symbolic: generator seed")
    p.add_argument("--no-report", action="store_true", help="do not rewrite OUT/REPORT.md and the plots")
    return p


def options(benchmark: str, **overrides) -> argparse.Namespace:
    """The command line's options as a namespace, for calling `arun` from Python (notebooks)."""
    p = parser()
    args, actions = p.parse_args([benchmark]), {a.dest: a for a in p._actions if a.dest != "benchmark"}
    for key, value in overrides.items():
        if key not in actions:
            raise FotError(f"unknown eval option {key!r}")
        check_option(actions[key], value)
        setattr(args, key, value)
    return args


def check_option(action: argparse.Action, value: object) -> None:
    """What the command line would refuse of a value given from Python: a wrong type (`code_checks=True` is not
    "on"), or a value outside the option's choices."""
    want = bool if action.nargs == 0 else action.type or str  # store_true options take a bool
    fits = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float:
        fits = isinstance(value, int | float) and not isinstance(value, bool)
    if want is str:  # a path may be a Path; an appended option is a list of them (`base_url`)
        if isinstance(action, argparse._AppendAction):
            fits = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            fits = isinstance(value, str | Path)
    if not fits and not (value is None and action.default is None):
        raise FotError(f"eval option {action.dest}={value!r}: expected {want.__name__}")
    if action.choices is not None and value not in action.choices:
        raise FotError(f"eval option {action.dest}={value!r}: one of {', '.join(map(str, action.choices))}")


async def arun(args: argparse.Namespace, backend=None) -> tuple[Path, int]:
    """Run (or resume) one benchmark run on `backend` (made from the options if None, and closed after); return
    the results file and the number of problems that failed."""
    if args.trees < 1 or args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        raise FotError("--trees, --concurrency and --limit must be >= 1")
    if getattr(args, "data_seed", 0) < 0:  # ids carry it: `gsm_symbolic-<seed>-<index>` must parse back
        raise FotError(f"--data-seed must be >= 0, got {args.data_seed}")
    bench = BENCHMARKS[args.benchmark]
    if getattr(args, "data", None) and args.benchmark in ("arithmetic", "gsm_symbolic"):
        raise FotError(f"--data: {args.benchmark} generates its problems (--n, --data-seed); it reads no file")
    asked = [f"--{n}-checks" for n in RULE_CHECKS if getattr(args, f"{n}_checks", "auto") == "on"]
    if asked and args.benchmark == "game24":  # else quietly not run: Game of 24 recomputes its steps instead
        raise FotError(f"{' and '.join(asked)}: math checks; Game of 24 recomputes each step with its own")
    if getattr(args, "program_trees", None):  # the records say how many trees answered with a program
        if not program_trees(args):
            raise FotError("--program-trees is for --method fot on math")
        if args.program_trees >= args.trees:
            raise FotError(f"--program-trees must be below --trees ({args.trees}): tree 0 reasons in prose")
    from fot.forest import check_method, make_config

    check_method(bench.task, args.method)
    make_config(search_config(args), trees=args.trees, method=args.method, seed=args.seed)  # before any model
    cli_backend = argparse.Namespace(**{**vars(args), "speculative": drafter(args)})
    if backend is None:
        check_cli_backend(cli_backend)  # before the data loads: that can take minutes
    elif backend.name in DRAFTERS and backend.name != args.backend:  # the records would name the wrong one
        raise FotError(f"the backend given is {backend.name} but the options say {args.backend}: pass backend=")
    if args.backend == "openai" and args.model == "default":  # "default" would read as the embedded 135M model
        raise FotError("--backend openai: name the served model with --model; the run's name and records carry it")
    if args.method not in ("fot", "sc"):
        args.trees = 1  # cot, tot and mctsr grow one tree (or one chain)
    loaded = bench.load(args)
    twice = sorted(i for i, k in Counter(p.id for p in loaded).items() if k > 1)
    if twice:  # a record is kept per id: the second problem's would be lost
        raise FotError(f"the data holds {len(twice)} ids more than once (first: {twice[0]!r}); ids must be unique")
    problems = loaded[: args.limit]
    path = Path(args.out) / bench.name / f"{run_name(args, loaded)}.jsonl"  # --limit leaves the run's name alone
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with writer_lock(path):
        held = read_records(path, repair=True)
        check_records(path, held, problems)
        done = {r.id for r in held}
        todo = [p for p in problems if p.id not in done]
        made = sorted({r.concurrency for r in held} - {args.concurrency})
        if todo and made:  # its seconds per problem would mix two loads
            raise FotError(
                f"{path.name} was run with --concurrency {', '.join(map(str, made))}: resume it with that, or use "
                "another --out"
            )
        print(f"evals: {path}: {len(done)} problems done, {len(todo)} to go", file=sys.stderr)
        if todo:
            t0 = time.perf_counter()
            if backend is None:
                async with make_cli_backend(cli_backend) as own:
                    right, failed = await solve_all(todo, args, path, own, len(problems))
            else:
                right, failed = await solve_all(todo, args, path, backend, len(problems))
            print(
                f"evals: {len(todo) - failed} solved in {time.perf_counter() - t0:.0f} s, {right} correct"
                + (f"; {failed} failed (re-run to retry them)" if failed else ""),
                file=sys.stderr,
            )
    records = [r for r in read_records(path) if r.id in {p.id for p in problems}]
    if records:
        acc = sum(r.correct for r in records) / len(records)
        print(f"{bench.name} {args.method} x{args.trees}: accuracy {acc:.1%} on {len(records)} problems -> {path}")
    if not args.no_report:
        from evals.report import write_report

        print(f"report: {write_report(Path(args.out))}")
    return path, failed


def main(argv: list[str] | None = None, benchmark: str | None = None) -> None:
    configure_caches()
    args = parser(benchmark).parse_args(argv)
    if benchmark:
        args.benchmark = benchmark
    from fot.decoding.base import run_sync

    try:
        _, failed = run_sync(arun(args))
    except FotError as e:
        print(f"evals: error: {e}", file=sys.stderr)
        sys.exit(2)
    if failed:
        sys.exit(1)
