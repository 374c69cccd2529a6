"""Forest-of-Thought cost: what batching and sparse activation buy, on the embedded model.

  batching  wall time of a 4-tree forest vs a 1-tree forest with the same per-tree budget (same rollouts and
            answer length; early stop and sparse activation off, so the forest does 4x the work): all trees'
            expansions of a step go to the engine as one batch, so the goal is <= 1.5x, not 4x;
  sparse    generated tokens of the 4-tree forest with sparse activation (top 2 trees keep expanding) vs without.
Math problems from a fixed generator; native backend with EMS-SD prompt lookup; sampled at the search's default
temperature with fixed seeds. Prints a table and, as its LAST line, one JSON object. `--quick` < 60 s.

    python benchmarks/forest.py [--quick] [--problems 2] [--rollouts 2] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from fot.decoding.native import NativeBackend
from fot.forest import asolve

PROBLEMS = [
    "Tom has 3 boxes with 12 apples in each box. He eats 5 apples. How many apples are left?",
    "A shop sells pens at 4 dollars each. Ana buys 6 pens and pays with a 50 dollar bill. What is her change?",
    "A train travels 80 km per hour for 3 hours. How many km does it travel?",
    "Mia reads 12 pages a day. How many pages does she read in 2 weeks?",
]


def run(backend, problems: list[str], trees: int, config: dict) -> tuple[float, int, int]:
    """Wall seconds, generated tokens, and tokens saved, for the problems solved one after the other."""
    t, tokens, saved = time.perf_counter(), 0, 0
    for i, p in enumerate(problems):
        sol = asyncio.run(asolve(p, backend=backend, trees=trees, config=config, seed=i))
        tokens, saved = tokens + sol.usage.generated_tokens, saved + sol.usage.tokens_saved
    return time.perf_counter() - t, tokens, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 problem, 1 rollout, 16-token answers (< 60 s)")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--rollouts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu", help="torch device of the native engine")
    args = ap.parse_args()
    problems = PROBLEMS[: args.problems or (1 if args.quick else 2)]
    rollouts = args.rollouts if args.rollouts is not None else (1 if args.quick else 2)
    max_tokens = args.max_tokens or (16 if args.quick else 96)
    mctsr = {"rollouts": rollouts, "max_tokens": max_tokens, "reward_samples": 1 if args.quick else 2}
    dense = {"mctsr": mctsr, "early_stop": False, "sparse": {"enabled": False}}
    sparse = {"mctsr": mctsr, "early_stop": False, "sparse": {"enabled": True, "top_k": 2}}

    backend = NativeBackend(model=args.model, device=args.device)
    run(backend, problems[:1], 1, {**dense, "mctsr": {**mctsr, "rollouts": 0, "max_tokens": 8}})  # warm-up
    one_s, one_tok, _ = run(backend, problems, 1, dense)
    four_s, four_tok, _ = run(backend, problems, 4, dense)
    sp_s, sp_tok, sp_saved = run(backend, problems, 4, sparse)
    asyncio.run(backend.close())

    ratio = four_s / one_s
    print(
        f"\n{len(problems)} problems, MCTSr {rollouts} rollouts, {max_tokens}-token answers, {args.model}, "
        f"native+SD, {args.device}"
    )
    print(f"{'forest':28} {'seconds':>8} {'tokens':>8} {'tok/s':>7}")
    for name, s, tok in [
        ("1 tree", one_s, one_tok),
        ("4 trees, dense", four_s, four_tok),
        ("4 trees, sparse (top 2)", sp_s, sp_tok),
    ]:
        print(f"{name:28} {s:8.1f} {tok:8d} {tok / s:7.1f}")
    print(f"4 trees / 1 tree wall time = {ratio:.2f}x for {four_tok / max(one_tok, 1):.2f}x the tokens (goal <= 1.5x)")
    print(f"sparse activation: {sp_tok} tokens vs {four_tok} dense ({sp_tok / four_tok:.2f}x); est. saved {sp_saved}")
    print(
        json.dumps(
            {
                "four_over_one_wall": round(ratio, 2),
                "four_over_one_tokens": round(four_tok / max(one_tok, 1), 2),
                "seconds": {"one": round(one_s, 1), "four": round(four_s, 1), "four_sparse": round(sp_s, 1)},
                "tokens": {"one": one_tok, "four": four_tok, "four_sparse": sp_tok},
                "sparse_over_dense_tokens": round(sp_tok / four_tok, 2),
                "tokens_saved_estimate": sp_saved,
                "problems": len(problems),
                "rollouts": rollouts,
                "max_tokens": max_tokens,
                "device": args.device,
            }
        )
    )


if __name__ == "__main__":
    main()
