"""Kangaroo self-speculative decoding in a batch, and the hybrid drafter, with the adapter shipped for the model.

Plain decoding, Kangaroo, the hybrid (prompt lookup where the context has a match, Kangaroo otherwise) and EMS-SD
prompt lookup run side by side in one process on the same MCTSr-style refine prompts (greedy, so the outputs must
agree; the script counts, per drafter and batch, how many equal plain decoding's in this dtype, and exits 1 after
its JSON where one differs in fp32 or on the CPU) at batch 1, 2, 4, 8 and 16. At batch 1, transformers' own assisted
generation is timed on the same prompt: its early-exit self-drafting (`assistant_early_exit`, the model's first
layers + its head, no adapter) and its prompt lookup. Speed is generated tokens per second of wall time, prefill
included. Prints a table and, as its LAST line, one JSON object. `--quick` (32 tokens, no transformers, prompt
lookup at batch 1 only: `ems_sd.py` measures it at every batch) < 60 s on the embedded model, < 3 minutes on the
1.5B one.

    python benchmarks/kangaroo.py [--quick] [--new-tokens 96] [--adapter DIR] [--threshold 0.4] [--steps 6]
        [--model qwen2.5-coder-1.5b]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from decode import add_model_options, at_least
from ems_sd import refine_prompt, time_hf_b1, timed, warm_up
from transformers import AutoModelForCausalLM

from fot.models import resolve_model
from fot.speculative.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 tokens, no transformers, prompt lookup at batch 1")
    ap.add_argument("--new-tokens", type=at_least(2), default=None)
    ap.add_argument("--adapter", default=None, help="adapter folder (default: the one shipped for the model)")
    ap.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: the adapter's)")
    ap.add_argument("--steps", type=at_least(1), default=6, help="max draft tokens per step")
    add_model_options(ap)
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 96)
    batches = (1, 2, 4, 8, 16)

    plain = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, max_batch=16)
    spec = {"adapter": args.adapter, "num_speculative_tokens": args.steps}
    if args.threshold is not None:
        spec["confidence_threshold"] = args.threshold
    configs = {"kangaroo": {**spec, "method": "kangaroo"}, "hybrid": {**spec, "method": "hybrid"}}
    configs["prompt_lookup"] = "prompt_lookup"
    engines = {
        name: Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, max_batch=16, speculative=config)
        for name, config in configs.items()
    }
    kg = engines["kangaroo"].proposer
    rng = random.Random(0)
    prompts = [refine_prompt(rng) for _ in range(max(batches))]
    report = {key: {} for key in ("plain_tok_s", *engines, "accept_len", "identical", "hybrid_sources")}
    warm_up([plain, *engines.values()], prompts)
    for batch in batches:
        b = str(batch)
        base, _, want = timed(plain, prompts[:batch], new_tokens)
        report["plain_tok_s"][b] = round(base, 1)
        report["accept_len"][b], report["identical"][b] = {}, {}
        line = f"batch {batch:2d}: plain {base:6.1f} tok/s"
        for name, engine in engines.items():
            if args.quick and name == "prompt_lookup" and batch > 1:
                continue
            speed, _, got = timed(engine, prompts[:batch], new_tokens)
            report[name][b] = round(speed / base, 2)
            report["accept_len"][b][name] = round(engine.last_stats.accept_length, 2)
            report["identical"][b][name] = sum(x == y for x, y in zip(got, want, strict=True))
            line += f", {name} {speed:6.1f} ({speed / base:.2f}x, accept length {report['accept_len'][b][name]})"
        report["hybrid_sources"][b] = engines["hybrid"].last_stats.by_source  # which drafter it took, how each fared
        print(line, flush=True)

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
    print(f"{'batch':>5} {'plain tok/s':>12}" + "".join(f" {name:>22}" for name in engines) + "  hybrid drafts")
    for batch in batches:
        b = str(batch)
        cells = "".join(
            f" {report[n][b]:5.2f}x (acc {report['accept_len'][b][n]:4.2f}, {report['identical'][b][n]:2d}/{batch})"
            if b in report[n]
            else f" {'-':>22}"
            for n in engines
        )
        sources = ", ".join(f"{k} {a}/{n}" for k, (n, a) in report["hybrid_sources"][b].items())
        print(f"{batch:5d} {report['plain_tok_s'][b]:12.1f}{cells}  {sources}")
    print("(speedup, accept length, outputs equal to plain decoding; hybrid drafts: accepted/proposed by source)")
    if hf:
        ours = report["kangaroo"]["1"] * report["plain_tok_s"]["1"]
        print(
            f"batch 1, transformers: plain {hf['plain']:.1f} tok/s, early-exit self-drafting (layer "
            f"{kg.exit_layer}) {hf['early_exit']:.1f}, prompt lookup {hf['prompt_lookup']:.1f}; ours kangaroo "
            f"{ours:.1f}"
        )
    result = {
        "kangaroo": report["kangaroo"],
        "hybrid": report["hybrid"],
        "accept_len": report["accept_len"],
        "hybrid_sources": report["hybrid_sources"],
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
        "dtype": str(plain.model.dtype).removeprefix("torch."),
    }
    print(json.dumps(result))
    exact = plain.model.dtype == torch.float32 or plain.device.type == "cpu"  # our CPU kernels are exact in bf16
    differ = [
        f"{n} at batch {b}: {k}/{b}" for b, row in report["identical"].items() for n, k in row.items() if k < int(b)
    ]
    if exact and differ:
        raise SystemExit("speculative output differs from plain decoding: " + "; ".join(differ))


if __name__ == "__main__":
    main()
