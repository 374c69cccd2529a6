"""Backends under the search's load: many requests fired concurrently, as the trees of a forest do.

64 MCTSr-style refine requests of 128 new tokens (greedy) are sent as 64 separate `generate` calls at once through
the Backend contract, to: the native engine (plain, EMS-SD prompt lookup, Kangaroo with the shipped adapter) and
vLLM in process (plain, with our Kangaroo proposer, with its own ngram speculator). On the embedded model
(`--model`: another with a shipped adapter), in one process, one after the other (native first: vLLM pins its
threads when it starts). Prints requests/s and tokens/s, ratios, whether the outputs agree, and as its LAST line
one JSON object. `--quick` (8 requests of 16 tokens, no speculative vLLM) < 60 s.

    python benchmarks/backends.py [--quick] [--requests 64] [--new-tokens 128] [--model qwen2.5-coder-1.5b]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch
from decode import at_least
from ems_sd import refine_prompt

from fot.decoding import Request
from fot.decoding.kangaroo_vllm import KANGAROO_VLLM
from fot.decoding.native import NativeBackend
from fot.decoding.vllm import VLLMBackend


async def fire(backend, requests: list[Request]) -> tuple[float, list[list[int]]]:
    """Wall seconds for all requests sent concurrently, one call each, and the generated token ids."""
    await asyncio.gather(*(backend.generate([r]) for r in requests[:2]))  # warm-up
    t = time.perf_counter()
    done = await asyncio.gather(*(backend.generate([r]) for r in requests))
    return time.perf_counter() - t, [c[0].token_ids for c in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests of 16 tokens, no speculative vLLM (< 60 s)")
    ap.add_argument("--requests", type=at_least(1), default=None)
    ap.add_argument("--new-tokens", type=at_least(1), default=None)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    n = args.requests or (8 if args.quick else 64)
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    rng = random.Random(0)
    requests = [Request.make(refine_prompt(rng), max_tokens=new_tokens, ignore_eos=True) for _ in range(n)]

    def native(speculative: str | None) -> NativeBackend:
        # each loads the model in its own worker thread: loading it here would make a second OpenMP team (see
        # fot.decoding.native), which measured ~2x slower decoding
        return NativeBackend(model=args.model, max_batch=n, speculative=speculative)

    makers = {
        "native": lambda: native(None),
        "native+prompt_lookup": lambda: native("prompt_lookup"),
        "native+kangaroo": lambda: native("kangaroo"),
        "vllm": lambda: VLLMBackend(model=args.model, max_num_seqs=n),
    }
    if not args.quick:
        kangaroo = KANGAROO_VLLM
        makers["vllm+kangaroo"] = lambda: VLLMBackend(model=args.model, max_num_seqs=n, speculative_config=kangaroo)
        ngram = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
        makers["vllm+ngram"] = lambda: VLLMBackend(model=args.model, max_num_seqs=n, speculative_config=ngram)

    results, outputs = {}, {}
    for name, make in makers.items():
        backend = make()
        seconds, outputs[name] = asyncio.run(fire(backend, requests))
        asyncio.run(backend.close())
        tokens = sum(len(t) for t in outputs[name])
        u = backend.usage
        results[name] = {
            "req_s": round(n / seconds, 2),
            "tok_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 2),
            "accept_rate": round(u.acceptance_rate, 3),
        }
        print(f"{name:22} {n / seconds:7.2f} req/s {tokens / seconds:8.1f} tok/s  ({seconds:.1f} s)", flush=True)
        del backend

    def agree(a: str, b: str) -> int:
        return sum(x == y for x, y in zip(outputs[a], outputs[b], strict=True))

    same, same_sd = agree("native", "vllm"), agree("native", "native+prompt_lookup")
    same_kg = agree("native", "native+kangaroo")
    same_vkg = agree("vllm", "vllm+kangaroo") if "vllm+kangaroo" in outputs else None  # both verified by vLLM
    best_native = max(results["native"]["tok_s"], results["native+prompt_lookup"]["tok_s"])
    print(f"\n{n} concurrent requests x {new_tokens} tokens, {args.model}, greedy, {torch.get_num_threads()} threads")
    print(f"{'backend':22} {'req/s':>7} {'tok/s':>8} {'vs vllm':>8} {'accept rate':>12}")
    for name, r in results.items():
        ratio = r["tok_s"] / results["vllm"]["tok_s"]
        print(f"{name:22} {r['req_s']:7.2f} {r['tok_s']:8.1f} {ratio:7.2f}x {r['accept_rate']:12.3f}")
    print(
        f"identical outputs: native+prompt_lookup vs native {same_sd}/{n}, native+kangaroo vs native "
        f"{same_kg}/{n}, vLLM vs native {same}/{n}"
        + (f", vllm+kangaroo vs vllm {same_vkg}/{n}" if same_vkg is not None else "")
        + " (a forward's shape changes its float sums, so near-tied argmaxes can flip between engines; the "
        "engine's losslessness is proven by the tests on fixed inputs)"
    )
    print(f"native+prompt_lookup/vllm = {results['native+prompt_lookup']['tok_s'] / results['vllm']['tok_s']:.2f}x")
    print(
        json.dumps(
            {
                "backends": results,
                "native_sd_over_vllm": round(results["native+prompt_lookup"]["tok_s"] / results["vllm"]["tok_s"], 2),
                "best_native_over_vllm": round(best_native / results["vllm"]["tok_s"], 2),
                "identical_native_vllm": same,
                "identical_native_sd": same_sd,
                "identical_native_kangaroo": same_kg,
                "identical_vllm_kangaroo": same_vkg,
                "model": args.model,
                "requests": n,
                "new_tokens": new_tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
