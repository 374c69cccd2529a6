"""Plain batched decoding: native engine vs transformers `generate`, and the batch-1 memory-bandwidth roofline.

Everything runs in one process on the embedded model, side by side, so the ratios are fair on a noisy machine:
the native engine and transformers take turns `--repeats` times, each batch-1 native run is followed by a read of
the memory bandwidth, and the table shows medians (of speeds, and of each turn's ratio). Prints a table and, as
its last line, one JSON object. `--quick` (one turn, 32 tokens) finishes in under a minute.

    python benchmarks/decode.py [--quick] [--repeats 3] [--new-tokens 128] [--dtype fast|auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from fot.models import resolve_model
from fot.speculative.engine import Engine
from fot.speculative.model import Transformer

QUESTIONS = [
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List the planets of the solar system and one fact about each.",
    "How do I make a good cup of coffee?",
]


def chat_prompts(batch: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type for a count: an integer >= `low`, so that 0 or a negative is refused before any model loads
    (`args.x or default` would take 0 for the default, and a negative count would run something else)."""

    def integer(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return integer


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--model, --dtype and --device, as every engine benchmark takes them."""
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 where our CPU kernels run, exact there; else fp32), float32, fast or bfloat16",
    )
    ap.add_argument("--device", default="cpu", help="torch device (cuda: pass --dtype float32 for exact output)")


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes per second of a plain streaming read (a sum over a large fp32 tensor), best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights read by a forward over one token: every weight held, less an untied embedding (a lookup)."""
    emb = model.tok_embeddings.weight
    lookup = 0 if emb.is_meta or model.args.tie_embeddings else emb.numel() * emb.element_size()
    return model.weight_bytes() - lookup


def time_native(engine: Engine, prompts: list, new_tokens: int) -> float:
    params = {"max_tokens": new_tokens, "ignore_eos": True}
    engine.generate(prompts, {"max_tokens": 4, "ignore_eos": True})  # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    return sum(o.generated_tokens for o in outs) / (time.perf_counter() - t)


def time_hf(model, tokenizer, prompts: list, new_tokens: int) -> float:
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    kw = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return generated / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, no unpacked-eager row (< 60 s)")
    ap.add_argument("--repeats", type=at_least(1), help="turns of native and transformers (default 3; quick 1)")
    ap.add_argument("--new-tokens", type=at_least(1), default=None)
    ap.add_argument("--dtype", default="fast", help="fast: bf16 where the CPU has it (the goal's setting)")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)

    engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_batch=16)
    dtype = engine.model.dtype
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=dtype).eval()
    weights = weight_bytes(engine.model)
    rows, result, fractions, bandwidths = [], {}, [], []
    for batch in (1, 16):
        natives, refs = [], []
        for _ in range(args.repeats):  # turns, so that a slow moment of a shared machine hits one pair
            natives.append(time_native(engine, chat_prompts(batch), new_tokens))
            if batch == 1:  # the roofline right beside the run it bounds
                bandwidths.append(read_bandwidth())
                fractions.append(natives[-1] * weights / bandwidths[-1])
            refs.append(time_hf(hf, engine.tokenizer, chat_prompts(batch), new_tokens))
        native, ref = statistics.median(natives), statistics.median(refs)
        ratio = statistics.median(n / r for n, r in zip(natives, refs, strict=True))
        result |= {f"native_tok_s_b{batch}": round(native, 1), f"hf_tok_s_b{batch}": round(ref, 1)}
        result[f"ratio_b{batch}"] = round(ratio, 2)
        result[f"ratios_b{batch}"] = [round(n / r, 2) for n, r in zip(natives, refs, strict=True)]
        rows.append((f"batch {batch}", native, ref, ratio, result[f"ratios_b{batch}"]))
    if not args.quick:  # what the packed oneDNN weights and our kernels are worth
        variants = {"unpacked": lambda m: m, "onednn": lambda m: m.pack_weights(use_kernels=False)}
        for name, prepare in variants.items():
            model = prepare(Transformer.from_pretrained(resolve_model(args.model), dtype))
            other = Engine(model, engine.tokenizer, eos_ids=engine.eos_ids, pack=False, max_batch=16)
            result[f"native_{name}_tok_s_b1"] = round(time_native(other, chat_prompts(1), new_tokens), 1)

    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth / weights
    result |= {
        "roofline_tok_s_b1": round(roofline, 1),
        "roofline_frac_b1": round(statistics.median(fractions), 3),
        "roofline_fracs_b1": [round(f, 3) for f in fractions],
        "read_gb_s": round(bandwidth / 1e9, 1),
        "read_gb_s_runs": [round(b / 1e9, 1) for b in bandwidths],
        "weight_mb": round(weights / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }

    print(
        f"\nplain decoding, {args.model}, {result['dtype']}, {new_tokens} new tokens, {result['threads']} threads, "
        f"median of {args.repeats} turns"
    )
    print(f"{'':10} {'native tok/s':>13} {'hf tok/s':>10} {'native/hf':>10}  each turn")
    for name, native, ref, ratio, turns in rows:
        print(f"{name:10} {native:13.1f} {ref:10.1f} {ratio:9.2f}x  " + ", ".join(f"{r:.2f}x" for r in turns))
    if "native_onednn_tok_s_b1" in result:
        print(
            f"batch 1 without our kernels: oneDNN packed {result['native_onednn_tok_s_b1']} tok/s, "
            f"unpacked F.linear {result['native_unpacked_tok_s_b1']} tok/s"
        )
    print(
        f"roofline at batch 1: {result['weight_mb']} MB of weights per token / {result['read_gb_s']} GB/s read "
        f"= {roofline:.1f} tok/s; native reaches {result['roofline_frac_b1']:.0%} of it (median of each turn's "
        f"fraction; reads {result['read_gb_s_runs']} GB/s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
