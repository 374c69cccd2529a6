"""What `fot serve` costs on top of the search: 16 concurrent clients through the HTTP server against the same
solves through `fot.asolve_many` in process, on one native backend in one process.

The server runs in a thread (uvicorn, its own event loop) over the same backend; the clients are httpx in the main
thread. Searches are greedy (temperature 0), so both sides generate the same tokens and the comparison is of the
serving alone; the script checks the answers and token counts agree. Turns interleave (in process, HTTP, HTTP, in
process, ...) and the medians are reported. Goals: HTTP costs at most 1.05x the in-process wall time per solve, and
adds at most 50 ms to the median latency. Prints a table and, as its LAST line, one JSON object. `--quick` < 2 minutes.

    python benchmarks/serve.py [--quick] [--clients 16] [--turns 3] [--model default]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx
import uvicorn
from decode import at_least

from fot.decoding.native import NativeBackend
from fot.forest import asolve
from fot.server import ServeConfig, create_app

ITEMS = ["apples", "pens", "books", "cards", "stamps", "shells", "coins", "marbles"]


def problems(n: int) -> list[str]:
    return [
        f"Tom has {3 + i % 5} boxes with {6 + i} {ITEMS[i % 8]} in each box. He gives away {2 + i % 4} "
        f"{ITEMS[i % 8]}. How many {ITEMS[i % 8]} are left?"
        for i in range(n)
    ]


async def in_process(backend, questions: list[str], config: dict) -> tuple[float, list[float], list[tuple]]:
    async def one(q: str) -> tuple[float, tuple]:
        t = time.perf_counter()
        s = await asolve(q, backend=backend, config=config)
        return time.perf_counter() - t, (s.answer, s.usage.generated_tokens)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(q) for q in questions))
    return time.perf_counter() - t0, [d[0] for d in done], [d[1] for d in done]


async def over_http(url: str, questions: list[str], config: dict) -> tuple[float, list[float], list[tuple]]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:

        async def one(q: str) -> tuple[float, tuple]:
            t = time.perf_counter()
            body = {"model": "fot", "messages": [{"role": "user", "content": q}], "fot": config}
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            reply = r.json()
            return time.perf_counter() - t, (reply["fot"]["answer"], reply["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(q) for q in questions))
    return time.perf_counter() - t0, [d[0] for d in done], [d[1] for d in done]


def start_server(backend, port: int, clients: int) -> uvicorn.Server:
    app = create_app(backend, ServeConfig(max_running=clients, max_queue=clients))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="fot-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # uvicorn ends its thread, not the process, when it cannot bind
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start on 127.0.0.1:{port} (is the port taken? --port)")
        time.sleep(0.05)
    return server


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 rollout, 24-token answers, 2 turns")
    ap.add_argument("--clients", type=at_least(1), default=16)
    ap.add_argument("--turns", type=at_least(1), default=None, help="turns of each side (default 3; --quick 2)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    turns = args.turns or (2 if args.quick else 3)
    mctsr = {"rollouts": 1, "max_tokens": 24 if args.quick else 64, "reward_samples": 1, "temperature": 0.0}
    config = {"trees": 2, "mctsr": mctsr}
    questions = problems(args.clients)

    backend = NativeBackend(model=args.model)
    server = start_server(backend, args.port, args.clients)
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(in_process(backend, questions, config))  # warm-up at full size (a first run is much slower)
    asyncio.run(over_http(url, questions, config))
    walls: dict[str, list[float]] = {"in process": [], "http": []}
    latencies: dict[str, list[float]] = {"in process": [], "http": []}
    results: dict[str, list] = {}
    for turn in range(turns):
        order = ["in process", "http"] if turn % 2 == 0 else ["http", "in process"]
        for side in order:
            run = in_process(backend, questions, config) if side == "in process" else over_http(url, questions, config)
            wall, lat, res = asyncio.run(run)
            walls[side].append(wall)
            latencies[side] += lat
            results.setdefault(side, res)
    server.should_exit = True  # the app's shutdown closes the backend
    time.sleep(1.0)

    wall = {k: statistics.median(v) for k, v in walls.items()}
    p50 = {k: statistics.median(v) for k, v in latencies.items()}
    p95 = {k: pct(v, 0.95) for k, v in latencies.items()}
    same = sum(a == b for a, b in zip(results["in process"], results["http"], strict=True))
    cost, added = wall["http"] / wall["in process"], (p50["http"] - p50["in process"]) * 1000
    print(f"\n{args.clients} concurrent solves (fot, 2 trees, 1 rollout, greedy), {args.model}, {turns} turns each")
    print(f"{'side':12} {'solves/s':>9} {'wall s':>8} {'p50 s':>7} {'p95 s':>7}")
    for side in walls:
        print(f"{side:12} {args.clients / wall[side]:9.2f} {wall[side]:8.2f} {p50[side]:7.2f} {p95[side]:7.2f}")
    print(f"http/in-process wall time = {cost:.3f}x (goal <= 1.05x); p50 latency +{added:.0f} ms (goal <= 50 ms)")
    print(f"answers and token counts equal on both sides: {same}/{args.clients}")
    print(
        json.dumps(
            {
                "clients": args.clients,
                "turns": turns,
                "model": args.model,
                "solves_per_s_in_process": round(args.clients / wall["in process"], 3),
                "solves_per_s_http": round(args.clients / wall["http"], 3),
                "http_over_in_process_wall": round(cost, 3),
                "p50_in_process_s": round(p50["in process"], 3),
                "p50_http_s": round(p50["http"], 3),
                "p95_in_process_s": round(p95["in process"], 3),
                "p95_http_s": round(p95["http"], 3),
                "p50_added_ms": round(added, 1),
                "same_results": same,
            }
        )
    )
    if same != args.clients:
        raise SystemExit(f"the server's answers or token counts differ from in-process solves: {same}/{args.clients}")


if __name__ == "__main__":
    main()
