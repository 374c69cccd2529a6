"""Kangaroo self-speculative decoding in a batch, on the embedded model with the shipped adapter.

Plain decoding and Kangaroo (and, for reference, EMS-SD prompt lookup) run side by side in one process on the
same MCTSr-style refine prompts (greedy, so the outputs must agree; the script counts it) at batch 1, 4 and 16.
At batch 1, transformers' own assisted generation is timed on the same prompt: its early-exit self-drafting
(`assistant_early_exit`, the model's first layers + its head, no adapter) and its prompt lookup. Speed is
generated tokens per second of wall time, prefill included. Prints a table and, as its LAST line, one JSON object.
`--quick` (batch 1 and 4, 32 tokens, no transformers) < 60 s.

    python benchmarks/kangaroo.py [--quick] [--new-tokens 96] [--adapter DIR] [--threshold 0.4] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from decode import add_model_options
from ems_sd import refine_prompt, time_hf_b1, timed
from transformers import AutoModelForCausalLM

from fot.models import resolve_model
from fot.speculative.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 4, 32 tokens, no transformers (< 60 s)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    ap.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: the adapter's)")
    ap.add_argument("--steps", type=int, default=6, help="max draft tokens per step")
    add_model_options(ap)
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 96)
    batches = (1, 4) if args.quick else (1, 4, 16)

    plain = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, max_batch=16)
    spec = {"method": "kangaroo", "adapter": args.adapter, "num_speculative_tokens": args.steps}
    if args.threshold is not None:
        spec["confidence_threshold"] = args.threshold
    engines = {
        "kangaroo": Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=16, speculative=spec),
        "prompt_lookup": Engine(
            plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=16, speculative="prompt_lookup"
        ),
    }
    kg = engines["kangaroo"].proposer
    rng = random.Random(0)
    prompts = [refine_prompt(rng) for _ in range(max(batches))]
    report = {name: {} for name in (*engines, "plain_tok_s", "accept_len", "identical")}
    for batch in batches:
        base, _, want = timed(plain, prompts[:batch], new_tokens)
        report["plain_tok_s"][str(batch)] = round(base, 1)
        line = f"batch {batch:2d}: plain {base:6.1f} tok/s"
        for name, engine in engines.items():
            speed, _, got = timed(engine, prompts[:batch], new_tokens)
            report[name][str(batch)] = round(speed / base, 2)
            if name == "kangaroo":
                report["accept_len"][str(batch)] = round(engine.last_stats.accept_length, 2)
                report["identical"][str(batch)] = sum(a == b for a, b in zip(got, want, strict=True))
            line += f", {name} {speed:6.1f} ({speed / base:.2f}x)"
        print(line, f"accept length {report['accept_len'][str(batch)]}", flush=True)

    hf = {}
    if not args.quick:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=plain.model.dtype)
        model = model.to(plain.device).eval()
        hf["plain"] = time_hf_b1(model, plain.tokenizer, prompts[0], new_tokens)
        hf["early_exit"] = time_hf_b1(
            model, plain.tokenizer, prompts[0], new_tokens, assistant_early_exit=kg.exit_layer
        )
        hf["prompt_lookup"] = time_hf_b1(model, plain.tokenizer, prompts[0], new_tokens, prompt_lookup_num_tokens=6)

    print(
        f"\nKangaroo: exit layer {kg.exit_layer}, threshold {kg.threshold}, max {kg.max_steps} steps, draft vocab "
        f"{'all' if kg.vocab is None else len(kg.vocab)}; {args.model}, greedy, {new_tokens} new tokens, "
        f"{args.device}, {torch.get_num_threads()} threads; speedup over plain decoding at the same batch size"
    )
    print(
        f"{'batch':>5} {'plain tok/s':>12} {'kangaroo':>9} {'prompt lookup':>14} {'accept len':>11} {'identical':>10}"
    )
    for batch in batches:
        b = str(batch)
        print(
            f"{batch:5d} {report['plain_tok_s'][b]:12.1f} {report['kangaroo'][b]:8.2f}x "
            f"{report['prompt_lookup'][b]:13.2f}x {report['accept_len'][b]:11.2f} {report['identical'][b]:>7}/{batch}"
        )
    if hf:
        ours = report["kangaroo"]["1"] * report["plain_tok_s"]["1"]
        print(
            f"batch 1, transformers: plain {hf['plain']:.1f} tok/s, early-exit self-drafting (layer "
            f"{kg.exit_layer}) {hf['early_exit']:.1f}, prompt lookup {hf['prompt_lookup']:.1f}; ours kangaroo "
            f"{ours:.1f}"
        )
    result = {
        "kangaroo": report["kangaroo"],
        "accept_len": report["accept_len"],
        "hf_early_exit_b1": round(hf["early_exit"], 1) if hf else None,
        "hf_prompt_lookup_b1": round(hf["prompt_lookup"], 1) if hf else None,
        "hf_plain_b1": round(hf["plain"], 1) if hf else None,
        "prompt_lookup": report["prompt_lookup"],
        "plain_tok_s": report["plain_tok_s"],
        "identical": report["identical"],
        "exit_layer": kg.exit_layer,
        "threshold": kg.threshold,
        "new_tokens": new_tokens,
        "device": args.device,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
