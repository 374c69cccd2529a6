"""`fot` command line: prepare-model, generate, demo (solve, eval, bench, train-adapter and serve join later)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fot.errors import FotError

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Give me three tips to stay focused while studying.",
    "Write a haiku about the sea.",
]


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from fot.models import resolve_model

    print(resolve_model(args.model))


def generate_and_print(
    model: str, questions: list[str], max_tokens: int, as_json: bool, speculative: str | None = None
) -> None:
    from fot.speculative.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model, speculative=speculative)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = engine.generate([[{"role": "user", "content": q}] for q in questions], {"max_tokens": max_tokens})
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


def cmd_demo(args: argparse.Namespace) -> None:
    print(f"fot demo: {len(DEMO_QUESTIONS)} chat prompts answered in one batch by the native engine")
    generate_and_print(args.model, DEMO_QUESTIONS, args.max_tokens, False)


def main(argv: list[str] | None = None) -> None:
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
    p = sub.add_parser("demo", help="the embedded model answers a few prompts in one batch")
    p.add_argument("--model", default="default")
    p.add_argument("--max-tokens", type=int, default=96)
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FotError as e:
        print(f"fot: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
