"""What a forward over a few tokens costs against one token: the price of every draft that speculative decoding
verifies. Calls the model's forward directly over one ragged step (`rows` samples x `tokens` new tokens each,
after `--cached` tokens of cache per sample), for every split of 1..32 tokens, in interleaved turns, and prints
each split's median time as a ratio to the one-token forward, beside the weight-read roofline (weight bytes read
per forward / a streaming read measured in each turn) and the compute bound at the faster GEMM rate on the
model's largest matmul (oneDNN's, where it runs the dtype, and ours), which instruction set our kernels were
built for, and whether our bf16 matmuls ran on AMX tiles (`FOT_AMX=0` runs them without). Peak RSS is read right
after loading, against the bytes of weights held. Its last line is one JSON object; a token
count's ratio there is its worst split. `--quick` (3 turns) takes under 2 minutes for the 1.5B model.

    python benchmarks/forward_cost.py [--model default|qwen2.5-coder-1.5b|FOLDER] [--dtype bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from decode import at_least, read_bandwidth, weight_bytes

from fot.models import resolve_model
from fot.speculative import kernels
from fot.speculative.cache import KVCache
from fot.speculative.kernels import resolve_dtype
from fot.speculative.model import Transformer

SPLITS = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)]
SPLITS += [(1, 16), (4, 4), (8, 2), (16, 1), (16, 2)]


def gemm_rate(n: int, k: int, dtype: torch.dtype, rows: int = 32, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a [rows, k] x [k, n] matmul: oneDNN's packed matmul where it runs this dtype, and ours where this
    CPU runs it."""
    w, x = torch.randn(n, k).to(dtype), torch.randn(rows, k).to(dtype)
    runs = {}
    if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        onednn = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        runs["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")
    built = kernels.load()
    if built is not None:
        ours = kernels.pack(w)
        runs["ours"] = lambda: built.matmul(x, ours, n)
    rates = {}
    for name, run in runs.items():
        run()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        rates[name] = 2 * rows * n * k / statistics.median(times) / 1e9
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cached", type=at_least(0), default=200, help="tokens already in each sample's cache")
    ap.add_argument("--repeats", type=at_least(1), default=None, help="interleaved turns (default 5; quick 3)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)

    dtype = resolve_dtype(args.dtype, "cpu")
    folder = resolve_model(args.model, prepare=False)  # a first conversion would count in the load time and peak RSS
    t0 = time.perf_counter()
    model = Transformer.from_pretrained(folder, dtype, pack=True)
    load_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    held, read = model.weight_bytes(), weight_bytes(model)
    a = model.args
    slots = max(r for r, _ in SPLITS)
    cache = KVCache(a.n_layers, slots, a.n_kv_heads, args.cached + 32, a.head_dim, dtype)
    cache.k.normal_()
    cache.v.normal_()
    cache.lengths[:] = [args.cached] * slots
    gen = torch.Generator().manual_seed(0)

    def forward(rows: int, n: int) -> float:
        step = cache.plan(list(range(rows)), [n] * rows)  # entries written past the cache, never kept
        tokens = torch.randint(0, a.vocab_size, (rows * n,), generator=gen)
        t = time.perf_counter()
        with torch.no_grad():
            model(tokens, step, cache)
        return time.perf_counter() - t

    for split in SPLITS:  # warm-up: first calls allocate
        forward(*split)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in SPLITS}
    bandwidths = []
    for _ in range(repeats):
        for split in SPLITS:
            times[split].append(forward(*split))
        bandwidths.append(read_bandwidth())
        forward(1, 1)  # the read leaves the caches and the allocator cold: not a turn's first forward
    median = {s: statistics.median(v) for s, v in times.items()}
    one = median[(1, 1)]
    ratio: dict[str, float] = {}
    for (rows, n), t in median.items():
        key = str(rows * n)
        if key != "1":
            ratio[key] = round(max(ratio.get(key, 0.0), t / one), 2)
    bandwidth = statistics.median(bandwidths)
    largest = max(
        (m for m in model.modules() if hasattr(m, "out_features") and m is not model.output),
        key=lambda m: m.out_features * m.in_features,
    )
    rates = gemm_rate(largest.out_features, largest.in_features, dtype)
    flops = 2 * read / dtype.itemsize  # per token, over the weights read

    print(
        f"\nforward cost, {args.model}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
        f"{args.cached} cached tokens per sample, median of {repeats} turns"
    )
    fastest = max(rates, key=rates.get)
    print(f"{'tokens':>6} {'rows x tokens':>14} {'ms':>8} {'x one':>7} {f'compute bound ({fastest})':>23}")
    for (rows, n), t in median.items():
        bound = rows * n * flops / (rates[fastest] * 1e9)
        print(f"{rows * n:6} {f'{rows} x {n}':>14} {t * 1e3:8.1f} {t / one:6.2f}x {bound * 1e3:20.1f} ms")
    roofline = read / bandwidth
    print(
        f"weight-read roofline: {read / 1e9:.2f} GB per forward / {bandwidth / 1e9:.1f} GB/s = "
        f"{roofline * 1e3:.1f} ms; the one-token forward takes {one * 1e3:.1f} ms ({roofline / one:.0%} of it)"
    )
    print("GEMM rate at 32 rows on the largest matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    print(f"our kernels: {kernels.running() or 'off'}")
    print(
        f"loaded in {load_s:.1f} s; peak RSS {rss / 1e9:.2f} GB for {held / 1e9:.2f} GB of weights held "
        f"({rss / held:.2f}x)"
    )
    print(
        json.dumps(
            {
                "ratio": ratio,
                "splits": {f"{r}x{n}": round(t / one, 3) for (r, n), t in median.items()},
                "one_token_ms": round(one * 1e3, 2),
                "roofline_ms": round(roofline * 1e3, 2),
                "read_gb_s": round(bandwidth / 1e9, 1),
                "gemm_gflops": {k: round(v) for k, v in rates.items()},
                "kernels": kernels.running(),
                "amx": kernels.amx(),
                "rss_gb": round(rss / 1e9, 3),
                "weight_gb": round(held / 1e9, 3),
                "rss_over_weights": round(rss / held, 3),
                "model": args.model,
                "dtype": str(dtype).removeprefix("torch."),
                "cached": args.cached,
                "repeats": repeats,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
