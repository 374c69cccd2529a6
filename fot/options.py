"""Command-line options shared by `fot` (solve, demo, serve) and the evals (`fot eval`, `python -m evals.X`), and the
one backend factory of both: each option is declared once, and a command line builds its backend one way."""

from __future__ import annotations

import argparse

from fot.errors import FotError

RULE_CHECKS = ("code", "arithmetic")
# What each --speculative choice means per backend (the openai backend's servers decide for themselves).
DRAFTERS: dict[str, dict[str, object]] = {
    "native": {
        "none": None, "prompt_lookup": "prompt_lookup", "kangaroo": {"method": "kangaroo"}, "hybrid": "hybrid",
    },
    "vllm": {
        "none": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
        "kangaroo": "kangaroo",
    },
    "openai": {"none": None},
}  # fmt: skip
DEFAULT_DRAFTER = {"native": "prompt_lookup", "vllm": "none", "openai": "none"}  # what --speculative means unsaid


def add_math_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--code-checks", default="auto", choices=["auto", "on", "off"],
        help="math: run the answers' Python safely and repair made-up outputs (auto: fot and mctsr only)",
    )  # fmt: skip
    p.add_argument(
        "--arithmetic-checks", default="auto", choices=["auto", "on", "off"],
        help="math: recompute the answers' 'a op b = c' statements and repair the first wrong one (auto: fot, mctsr)",
    )  # fmt: skip
    p.add_argument(
        "--program-trees", type=int, default=None,
        help="math, fot: how many trees are asked to answer with a Python program (program of thought)",
    )  # fmt: skip


def add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="fot", choices=["cot", "sc", "tot", "mctsr", "fot"])
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument(
        "--fallback-samples", type=int, default=None,
        help="fot: chains of thought that vote with the trees when they tie and the expert does not know (default 1)",
    )  # fmt: skip


def add_budget_options(p: argparse.ArgumentParser, rollouts: int = 4, max_tokens: int = 384) -> None:
    p.add_argument("--trees", type=int, default=4, help="trees per problem (samples for sc)")
    p.add_argument("--rollouts", type=int, default=rollouts, help="MCTSr rollouts per tree")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="per MCTSr answer")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="native", choices=["native", "vllm", "openai"])
    p.add_argument("--model", default="default", help="model name or folder (for openai: the served name)")
    p.add_argument("--base-url", action="append", help="an OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--timeout", type=float, help="openai: seconds for each request, retries included (default 900)")


def search_config(args: argparse.Namespace) -> dict:
    """The search options that `fot solve`'s and `fot eval`'s command lines set."""
    config: dict = {"mctsr": {"rollouts": args.rollouts, "max_tokens": args.max_tokens}}
    for name in ("program_trees", "fallback_samples"):
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    if any(getattr(args, f"{name}_checks", "auto") != "auto" for name in RULE_CHECKS):
        on = checks_on(args)  # on: also for cot and sc; off: not even for fot
        config["correction"] = on | {"baselines": any(on.values())}
    return config


def checks_on(args: argparse.Namespace) -> dict[str, bool]:
    """Which rule checks a math search with these options runs (auto: on for fot and mctsr, off for cot and sc)."""
    method = getattr(args, "method", "fot")
    return {
        name: (v := getattr(args, f"{name}_checks", "auto")) == "on" or v == "auto" and method in ("fot", "mctsr")
        for name in RULE_CHECKS
    }


def check_cli_backend(args: argparse.Namespace) -> None:
    """The command line's backend options, checked without building anything: `fot eval` calls it before its data
    loads, `make_cli_backend` before a model does."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        raise FotError(f"--timeout must be > 0 seconds, got {timeout}")
    speculative = getattr(args, "speculative", None)
    if speculative is not None and speculative not in DRAFTERS[args.backend]:
        raise FotError(
            f"--speculative {speculative} is not available on the {args.backend} backend: {[*DRAFTERS[args.backend]]}"
        )
    if args.backend == "openai" and not args.base_url:
        raise FotError("--backend openai needs --base-url (one per endpoint)")
    if args.backend != "openai" and args.base_url:
        raise FotError(f"--base-url names endpoints of the openai backend; add --backend openai (not {args.backend})")
    if args.backend != "openai" and timeout is not None:
        raise FotError("--timeout bounds the requests of the openai backend; the in-process backends have none")
    if args.backend != "native":  # else they would name the run and its records, yet not reach the backend
        given = [f"--{k}" for k, unset in (("device", "cpu"), ("dtype", "auto")) if getattr(args, k, unset) != unset]
        if given:
            raise FotError(f"{' and '.join(given)}: options of the native backend; {args.backend} sets its own")


def make_cli_backend(args: argparse.Namespace):
    """The backend a command line asks for. Options a command does not have (`fot solve` has no --speculative,
    --device, --dtype or --max-batch) keep the backend's defaults; bad combinations fail before a model loads."""
    from fot.decoding import make_backend

    check_cli_backend(args)
    timeout = getattr(args, "timeout", None)
    options: dict = {}
    if getattr(args, "speculative", None) is not None:
        options["speculative"] = DRAFTERS[args.backend][args.speculative]
    if args.backend == "openai":
        model = None if args.model == "default" else args.model
        deadline = {"deadline": timeout} if timeout is not None else {}
        return make_backend("openai", base_urls=args.base_url, model=model, **deadline)  # the servers decide decoding
    if args.backend == "native":
        options |= {k: getattr(args, k) for k in ("device", "dtype", "max_batch") if getattr(args, k, None) is not None}
        return make_backend("native", model=args.model, **options)
    vllm: dict = {}  # the same options under vLLM's names
    if "speculative" in options:
        spec = options["speculative"]
        if spec == "kangaroo":
            from fot.decoding.kangaroo_vllm import KANGAROO_VLLM

            spec = KANGAROO_VLLM
        vllm["speculative_config"] = spec
    if getattr(args, "max_batch", None) is not None:
        vllm["max_num_seqs"] = args.max_batch
    return make_backend("vllm", model=args.model, **vllm)
