"""`fot.solve` end to end on real models: the tiny random one and the embedded SmolLM2, through the native engine
and through vLLM in process. A 135M model is not expected to be right; these check the whole machinery runs on
real generations: trees are built, votes counted, usage measured, and the answer (if any) is what the trees said."""

from __future__ import annotations

import asyncio
import json

import networkx as nx
import pytest

import fot
from fot.cli import main as cli
from fot.decoding import make_backend
from fot.tasks import Game24Task

SMALL = {"mctsr": {"rollouts": 1, "max_tokens": 48, "reward_samples": 2}, "tot": {"propose_tokens": 64}}


def check_solution(sol: fot.Solution, trees: int) -> None:
    assert len(sol.tree_answers) == len(sol.trees) == trees
    for i in range(trees):
        g = sol.graph(i)
        assert nx.is_arborescence(g) and g.number_of_nodes() >= (3 if sol.task == "math" else 1)
    if sol.decision in ("majority", "plurality"):
        assert sol.answer in sol.votes and sol.votes[sol.answer] == max(sol.votes.values())
    u = sol.usage
    assert u.requests > 0 and u.generated_tokens > 0 and u.prompt_tokens > 0 and u.forward_passes > 0
    assert u.seconds > 0 and u.backend_calls >= 2


def test_solve_on_the_tiny_model(served_model_dir):
    backend = make_backend("native", model=str(served_model_dir))
    sol = fot.solve("What is 12 + 30?", backend=backend, trees=3, config=SMALL)
    check_solution(sol, 3)
    sols = fot.solve_many(["What is 1 + 1?", "4 6 1 10"], backend=backend, trees=2, config=SMALL)
    assert [s.task for s in sols] == ["math", "game24"]
    for s in sols:
        check_solution(s, 2)


def test_a_seeded_solve_is_the_same_search_with_or_without_the_lockstep_barrier(served_model_dir):
    """Without the barrier the trees' calls reach the engine in the order they finish, in other batches; sampling is
    a function of each request's seed and a token's position, and self-correction seeds from the corrected request,
    so the search is the same."""
    backend = make_backend("native", model=str(served_model_dir))
    config = {**SMALL, "mctsr": {**SMALL["mctsr"], "temperature": 0.8}}
    a, b = (
        fot.solve("What is 12 + 30?", backend=backend, trees=3, seed=5, config={**config, "lockstep": lockstep})
        for lockstep in (True, False)
    )
    assert a.tree_answers == b.tree_answers and a.trees == b.trees
    assert a.usage.generated_tokens == b.usage.generated_tokens and a.usage.backend_calls < b.usage.backend_calls
    asyncio.run(backend.close())


def test_a_cancelled_solve_leaves_no_work_in_the_engine(served_model_dir):
    """Once the cancellation of a search ends (a client hung up on `fot serve`), the batches its trees had in
    flight are out of the engine: nothing runs on for it, and its slots are free."""
    backend = make_backend("native", model=str(served_model_dir), speculative=None)
    long = {"mctsr": {"rollouts": 4, "max_tokens": 48}}

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(fot.asolve("What is 12 + 30?", backend=backend, trees=4, config=long))
        while backend.usage.forward_passes < 5 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend.engine.idle and backend.engine.stats.cancelled > 0
        passes = backend.usage.forward_passes
        await asyncio.sleep(0.3)
        assert backend.usage.forward_passes == passes

    asyncio.run(cancel_midway())
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def native_embedded():
    b = make_backend("native", model="default")
    yield b
    asyncio.run(b.close())


def test_solve_math_on_the_embedded_model(native_embedded):
    sol = fot.solve(
        "Tom has 3 boxes with 12 apples in each box. He eats 5 apples. How many apples are left?",
        backend=native_embedded,
        trees=2,
        config=SMALL,
    )
    check_solution(sol, 2)
    assert sol.usage.draft_tokens > 0  # the default native backend drafts with prompt lookup


def test_solve_game24_on_the_embedded_model(native_embedded):
    sol = fot.solve("4 6 1 10", backend=native_embedded, trees=2, config=SMALL)
    check_solution(sol, 2)
    if sol.answer is not None:  # whatever the model proposed, an answer is only ever an exactly checked one
        assert Game24Task().check("4 6 1 10", f"Answer: {sol.answer}") == []


def test_solve_through_vllm_in_process():
    backend = make_backend("vllm", model="default", max_model_len=1024)
    try:
        sol = fot.solve("What is 7 times 8?", backend=backend, trees=2, config=SMALL)
        check_solution(sol, 2)
    finally:
        asyncio.run(backend.close())


def test_cli_solve_json(served_model_dir, capsys):
    cli(["solve", "What is 2 + 2?", "--model", str(served_model_dir), "--trees", "2", "--rollouts", "1",
         "--max-tokens", "24", "--json"])  # fmt: skip
    sol = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sol["task"] == "math" and len(sol["tree_answers"]) == 2 and sol["usage"]["generated_tokens"] > 0


def test_cli_solve_bad_input_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["solve", "1 2 3", "--task", "game24"])
    assert e.value.code == 2 and "four numbers" in capsys.readouterr().err


def test_cli_demo_prints_answers_votes_repairs_and_wall_time(capsys):
    cli(["demo", "--model", "default", "--trees", "2", "--max-tokens", "24"])
    out = capsys.readouterr().out
    assert "2 trees on default" in out and out.count("answer: ") == 2 and out.count("votes ") == 2
    assert "rule checks: " in out and "statements recomputed" in out  # the math problem's checks, counted
    assert "wall time " in out


def test_cli_demo_on_an_openai_server_asks_for_its_model(vllm_url, capsys):
    """The demo asked every server for the reasoning model by name, and failed where it was served as another."""
    cli(["demo", "--backend", "openai", "--base-url", vllm_url, "--trees", "2", "--max-tokens", "24"])
    out = capsys.readouterr().out
    assert "(OpenAI-compatible server)" in out and out.count("answer: ") == 2


@pytest.mark.parametrize(
    ("argv", "code", "arithmetic", "correction"),
    [
        ([], True, True, None),  # fot: both by default, the config's defaults untouched
        (["--method", "mctsr"], True, True, None),
        (["--method", "cot"], False, False, None),
        (["--method", "sc", "--code-checks", "on"], True, False,
         {"code": True, "arithmetic": False, "baselines": True}),
        (["--arithmetic-checks", "off"], True, False, {"code": True, "arithmetic": False, "baselines": True}),
        (["--code-checks", "off", "--arithmetic-checks", "off"], False, False,
         {"code": False, "arithmetic": False, "baselines": False}),
    ],
)  # fmt: skip
def test_the_check_options_resolve_per_method(argv, code, arithmetic, correction):
    from fot.cli import build_parser
    from fot.options import checks_on, search_config

    args = build_parser().parse_args(["solve", "p", *argv])
    assert checks_on(args) == {"code": code, "arithmetic": arithmetic}
    assert search_config(args).get("correction") == correction
