"""EMS-SD: speculative decoding of a batch with prompt-lookup drafts, unpadded vs the padded ("vanilla") layout.

For each workload and batch size, plain decoding, unpadded SD and padded SD run side by side in one process on the
embedded model (greedy, so all three must produce the same tokens; the script checks it and exits 1 if not). Speed
is generated tokens per second of wall time, prefill included. Workloads, 16 distinct prompts each:
  refine   MCTSr-style: a problem and a draft answer, "rewrite the answer" (the answer is largely copied)
  extract  a short report, "copy out every sentence that mentions a number" (copy-heavy)
Prints the paper-style table and, as its last line, one JSON object, with how many outputs of each batch equal
plain decoding's. `--quick` (extract only, 32 tokens, the padded baseline at batch 8 only: the batch of its goal)
finishes in under a minute on the embedded model and in under 3 minutes on qwen2.5-coder-1.5b.

    python benchmarks/ems_sd.py [--quick] [--new-tokens 96] [--k 8] [--model qwen2.5-coder-1.5b]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from decode import add_model_options, at_least
from transformers import AutoModelForCausalLM

from fot.config import SpeculativeConfig
from fot.models import resolve_model
from fot.speculative.engine import Engine

NAMES = ["Tom", "Ana", "Ravi", "Mia", "Omar", "Lena", "Kofi", "Yuki"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells"]
PLACES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tromso", "Perth", "Krakow", "Dakar"]


def refine_prompt(rng: random.Random) -> list[dict[str, str]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, each, gone, more = rng.randint(2, 9), rng.randint(5, 20), rng.randint(1, 9), rng.randint(2, 12)
    total = boxes * each
    question = (
        f"{name} has {boxes} boxes with {each} {item} in each box. {name} gives away {gone} {item} and then buys "
        f"{more} more. How many {item} does {name} have now?"
    )
    answer = (
        f"{name} starts with {boxes} boxes of {each} {item}, so {boxes} * {each} = {total} {item}. After giving "
        f"away {gone}, {name} has {total} - {gone} = {total - gone} {item}. Buying {more} more gives "
        f"{total - gone} + {more} = {total - gone + more} {item}. The answer is {total - gone + more}."
    )
    content = (
        f"Problem: {question}\nDraft answer: {answer}\nRewrite the draft answer step by step, fixing any mistakes."
    )
    return [{"role": "user", "content": content}]


def extract_prompt(rng: random.Random) -> list[dict[str, str]]:
    place = rng.choice(PLACES)
    facts = [
        f"The city of {place} opened a new library in {rng.randint(1990, 2024)}.",
        "Its reading room is bright and quiet, and locals love it.",
        f"The library holds {rng.randint(20, 90)} thousand books and {rng.randint(100, 900)} maps.",
        "Visitors often stay for the whole afternoon.",
        f"About {rng.randint(200, 950)} people visit it every day.",
        "The building was designed by a local architect.",
        f"Its cafe sells {rng.randint(50, 400)} cups of coffee each week.",
    ]
    rng.shuffle(facts)
    text = " ".join(facts)
    content = f"Text: {text}\nCopy out, word for word, every sentence of the text that contains a number."
    return [{"role": "user", "content": content}]


WORKLOADS = {"refine": refine_prompt, "extract": extract_prompt}


def warm_up(engines: list[Engine], prompts: list) -> None:
    """One short run per engine before any timing: its first forwards build kernels and buffers. Once each, not
    once per batch size: the later runs are warm already."""
    for engine in engines:
        engine.generate(prompts[:2], {"max_tokens": 4})


def timed(engine: Engine, prompts: list, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """Generated tokens per second of wall time, the same for the decode phase alone (the tokens after each
    prompt's first, over the time outside prefill), and the outputs (the engine warmed up: `warm_up`)."""
    t = time.perf_counter()
    outs = engine.generate(prompts, {"max_tokens": new_tokens})
    elapsed = time.perf_counter() - t
    tokens = sum(o.generated_tokens for o in outs)
    decode = (tokens - len(outs)) / engine.last_stats.decode_seconds if tokens > len(outs) else 0.0
    return tokens / elapsed, decode, [o.token_ids for o in outs]


def time_hf_b1(model, tokenizer, prompt: list, new_tokens: int, **kw) -> float:
    """transformers `generate` at batch 1 (its prompt lookup cannot batch), generated tokens per second."""
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids.to(model.device)
    args = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
    with torch.no_grad():
        model.generate(**ids, **{**args, "max_new_tokens": 4})  # warm-up
        t = time.perf_counter()
        out = model.generate(**ids, **args)
        out = out.tolist()[0]  # on a GPU: waits for the last kernels
    return (len(out) - ids["input_ids"].shape[1]) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="extract workload, 32 tokens, padded at batch 8 only")
    ap.add_argument("--new-tokens", type=at_least(2), default=None)
    ap.add_argument("--k", type=at_least(1), default=8, help="num_speculative_tokens")
    ap.add_argument("--threshold", type=float, default=None, help="draft_threshold (default: the config's)")
    ap.add_argument("--budget", type=int, default=None, help="max_draft_tokens_per_step (default: the config's)")
    add_model_options(ap)
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 96)
    batches = (1, 2, 4, 8, 16)
    workloads = ["extract"] if args.quick else list(WORKLOADS)

    tuning = {"draft_threshold": args.threshold, "max_draft_tokens_per_step": args.budget}
    tuning = {k: v for k, v in tuning.items() if v is not None}
    plain = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, max_batch=16)
    layouts = {
        layout: Engine(
            plain.model,
            plain.tokenizer,
            eos_ids=plain.eos_ids,
            max_batch=16,
            speculative=SpeculativeConfig(num_speculative_tokens=args.k, layout=layout, **tuning),
        )
        for layout in ("unpadded", "padded")
    }
    hf = None
    if not args.quick:  # transformers' own prompt lookup at batch 1, for reference
        hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=plain.model.dtype)
        hf = hf.to(plain.device).eval()
    rows, report, differ = [], {}, []
    # the padded baseline's attention is SDPA over masked pads, which rounds a verification forward unlike a
    # one-token forward: exact in fp32 only. The unpadded layout must be exact in either dtype.
    inexact, bf16 = [], plain.model.dtype == torch.bfloat16
    for workload in workloads:
        rng = random.Random(0)
        prompts = [WORKLOADS[workload](rng) for _ in range(max(batches))]
        keys = ("unpadded", "padded", "accept_len", "plain_tok_s", "tok_s", "decode_unpadded", "decode_padded")
        keys += ("identical_unpadded", "identical_padded")
        report[workload] = {key: {} for key in keys}
        warm_up([plain, *layouts.values()], prompts)
        for batch in batches:
            base, base_decode, want = timed(plain, prompts[:batch], new_tokens)
            speeds, decode = {}, {}
            for layout, engine in layouts.items():
                if args.quick and layout == "padded" and batch != 8:
                    continue
                speeds[layout], decode[layout], got = timed(engine, prompts[:batch], new_tokens)
                report[workload][f"identical_{layout}"][str(batch)] = sum(
                    a == b for a, b in zip(got, want, strict=True)
                )
                if got != want:  # reported after the table, so that one near-tie does not lose the whole run
                    same = sum(a == b for a, b in zip(got, want, strict=True))
                    found = f"{layout} {workload} batch {batch}: {same}/{batch} outputs identical"
                    (inexact if layout == "padded" and bf16 else differ).append(found)
            accept = layouts["unpadded"].last_stats.accept_length
            r = report[workload]
            r["plain_tok_s"][str(batch)] = round(base, 1)
            r["tok_s"][str(batch)] = round(speeds["unpadded"], 1)
            r["unpadded"][str(batch)] = round(speeds["unpadded"] / base, 2)
            r["accept_len"][str(batch)] = round(accept, 2)
            for layout in speeds:
                r[layout][str(batch)] = round(speeds[layout] / base, 2)
                r[f"decode_{layout}"][str(batch)] = round(decode[layout] / base_decode, 2)
            padded = speeds.get("padded")
            rows.append((workload, batch, base, speeds["unpadded"], padded, accept, decode["unpadded"] / base_decode))
            if batch == 1 and hf is not None:
                r["hf_b1_tok_s"] = round(time_hf_b1(hf, plain.tokenizer, prompts[0], new_tokens), 1)
                pld = time_hf_b1(hf, plain.tokenizer, prompts[0], new_tokens, prompt_lookup_num_tokens=6)
                r["hf_prompt_lookup_b1_tok_s"] = round(pld, 1)
                print(f"{workload} batch 1: transformers {r['hf_b1_tok_s']} tok/s, with prompt lookup {pld:.1f}")
            print(
                f"{workload} batch {batch}: plain {base:.1f} tok/s, unpadded {speeds['unpadded']:.1f}, "
                f"padded {'-' if padded is None else f'{padded:.1f}'}, accept length {accept:.2f}",
                flush=True,
            )

    spec = layouts["unpadded"].speculative
    print(
        f"\nEMS-SD, prompt lookup (k={args.k}, threshold {spec.draft_threshold}, "
        f"budget {spec.max_draft_tokens_per_step}), {args.model}, greedy, {new_tokens} new tokens, "
        f"{args.device}, {torch.get_num_threads()} threads; speedup over plain decoding at the same batch size"
    )
    print(
        f"{'workload':9} {'batch':>5} {'plain tok/s':>12} {'unpadded':>16} {'padded':>16} {'unpad/pad':>10} "
        f"{'accept len':>11} {'decode-only':>13}"
    )
    for workload, batch, base, unpadded, padded, accept, decode in rows:
        cells = f"{'-':>16} {'-':>10}"
        if padded is not None:
            cells = f"{padded:9.1f} {padded / base:5.2f}x {unpadded / padded:9.2f}x"
        print(
            f"{workload:9} {batch:5d} {base:12.1f} {unpadded:9.1f} {unpadded / base:5.2f}x {cells} {accept:11.2f} "
            f"{decode:12.2f}x"
        )
    for workload, r in report.items():
        if "hf_b1_tok_s" in r:
            print(
                f"{workload}, batch 1, transformers: plain {r['hf_b1_tok_s']} tok/s, prompt lookup (6 tokens) "
                f"{r['hf_prompt_lookup_b1_tok_s']} tok/s; ours unpadded {r['tok_s']['1']} tok/s"
            )
    headline = report[workloads[0]]
    result = {
        "unpadded": headline["unpadded"],
        "padded": headline["padded"],
        "accept_len": headline["accept_len"],
        "hf_prompt_lookup_b1": headline.get("hf_prompt_lookup_b1_tok_s"),
        "workload": workloads[0],
        "workloads": report,
        "new_tokens": new_tokens,
        "k": args.k,
        "device": args.device,
        "draft_threshold": spec.draft_threshold,
        "max_draft_tokens_per_step": spec.max_draft_tokens_per_step,
        "dtype": str(plain.model.dtype).removeprefix("torch."),
        "differ": differ,
        "padded_inexact": inexact,
    }
    if inexact:
        print("padded baseline, bf16 (SDPA rounding; not a lossless path): " + "; ".join(inexact))
    print(json.dumps(result))
    if differ:
        raise SystemExit("speculative output differs from plain decoding: " + "; ".join(differ))


if __name__ == "__main__":
    main()
