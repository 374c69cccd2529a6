"""One contract, every backend: the same assertions against the native engine, vLLM in process, and a real
`vllm serve` over HTTP, all on the same tiny random model (head size 32: vLLM's CPU attention needs >= 32)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn
from servers import free_port

import fot.decoding.vllm
from fot.decoding import BackendError, Completion, Request, make_backend
from fot.decoding.scripted import ScriptedBackend
from fot.errors import InvalidRequestError, ModelError
from fot.server import create_app

BACKENDS = ["native", "vllm", "openai"]
PROMPTS = ["The quick brown fox", "12 + 30 =", "Game of 24: 4 + 6 = 10 (left: 1 10 4). What", "Paris"]


def build(kind: str, model_dir, url: str | None):
    """fp32 everywhere (the server is started with --dtype float32): the same tokens need the same precision."""
    if kind == "native":
        return make_backend("native", model=str(model_dir), dtype="float32", speculative="prompt_lookup")
    if kind == "vllm":
        return make_backend("vllm", model=str(model_dir), dtype="float32", max_model_len=512)
    return make_backend("openai", base_urls=[url], model="tiny")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, served_model_dir):
    url = request.getfixturevalue("vllm_url") if request.param == "openai" else None
    b = build(request.param, served_model_dir, url)
    yield b
    asyncio.run(b.close())


def generate(backend, requests) -> list[Completion]:
    return asyncio.run(backend.generate(requests))


def greedy(prompt, n_tokens: int = 12, **kw) -> Request:
    return Request.make(prompt, max_tokens=n_tokens, ignore_eos=True, **kw)


def test_greedy_is_ordered_complete_and_deterministic(backend):
    reqs = [greedy(p, 8 + i) for i, p in enumerate(PROMPTS)]
    first, again = generate(backend, reqs), generate(backend, reqs)
    for i, (c, d) in enumerate(zip(first, again, strict=True)):
        assert c.ok and len(c.outputs) == 1
        assert c.finish_reason == "length" and len(c.token_ids) == 8 + i == c.generated_tokens
        assert c.prompt_tokens > 0 and c.text
        assert c.token_ids == d.token_ids and c.text == d.text


def test_n_samples_with_seed_and_logprobs(backend):
    [c] = generate(backend, [Request.make("12 + 30 =", n=3, temperature=1.0, seed=7, max_tokens=10, logprobs=True)])
    assert len(c.outputs) == 3 and len(c.texts) == 3
    for o in c.outputs:
        assert 1 <= o.generated_tokens <= 10
        assert len(o.logprobs) == o.generated_tokens and all(lp <= 0 for lp in o.logprobs)
        assert o.mean_logprob < 0
    [again] = generate(backend, [Request.make("12 + 30 =", n=3, temperature=1.0, seed=7, max_tokens=10)])
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in c.outputs]  # seeded: reproducible


def test_n_greedy_samples_are_n_copies_on_every_backend(backend):
    """vLLM refuses greedy n > 1 (a raw error, after the batch's other requests had gone to the engine); the native
    engine serves it. Every backend now answers with n copies of the one greedy sample."""
    c, one = generate(backend, [greedy("12 + 30 =", 6, n=3), greedy("12 + 30 =", 6)])
    assert len(c.outputs) == 3 and all(o.token_ids == one.token_ids for o in c.outputs)
    assert c.generated_tokens == 3 * one.generated_tokens


def test_chat_messages(backend):
    [c] = generate(backend, [greedy([{"role": "user", "content": "What is the capital of France?"}], 6)])
    assert c.ok and c.generated_tokens == 6 and c.prompt_tokens > 8  # the chat template's tokens count too


def test_stop_string_cuts_the_text(backend):
    [full] = generate(backend, [greedy("The quick brown fox", 24)])
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), full.text
    [cut] = generate(backend, [greedy("The quick brown fox", 24, stop=[stop])])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_concurrent_callers_are_all_served_in_order(backend):
    async def many():
        calls = [backend.generate([greedy(p, 5), greedy(p + " and", 6)]) for p in PROMPTS * 2]
        return await asyncio.gather(*calls)

    results = asyncio.run(many())
    assert all(len(r) == 2 and r[0].generated_tokens == 5 and r[1].generated_tokens == 6 for r in results)
    assert [r[0].token_ids for r in results[:4]] == [r[0].token_ids for r in results[4:]]


def test_usage_counters(backend):
    before = backend.usage.model_copy()
    done = generate(backend, [greedy(p, 7) for p in PROMPTS])
    u = backend.usage
    assert u.requests - before.requests == len(PROMPTS)
    assert u.generated_tokens - before.generated_tokens == 7 * len(PROMPTS)
    assert u.prompt_tokens - before.prompt_tokens == sum(c.prompt_tokens for c in done)
    if backend.name != "openai":  # a server does not tell a client how many forwards it ran
        assert u.forward_passes > before.forward_passes


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": " "},
        {"prompt": "hi", "params": {"n": 0}},
        {"prompt": "hi", "params": {"max_tokens": 100_000}},
        {"prompt": [{"role": "user"}]},
        {"prompt": "hi", "params": {"n": 2, "temperature": 1.0, "seed": 2**63 - 1}},  # failed the batch, mid-run
    ],
    ids=["empty", "n0", "over-context", "bad-chat", "seed-past-2**63"],
)
def test_bad_input_fails_before_any_work(backend, bad):
    before = backend.usage.requests
    with pytest.raises(InvalidRequestError):
        generate(backend, [greedy("fine"), bad])
    assert backend.usage.requests == before


def test_native_and_vllm_agree_on_greedy_tokens(served_model_dir, vllm_url):
    """Same model, same tokens: the three backends are interchangeable under the search."""
    reqs = [greedy(p, 10) for p in PROMPTS]
    outs = {}
    for kind in BACKENDS:
        b = build(kind, served_model_dir, vllm_url if kind == "openai" else None)
        outs[kind] = [c.token_ids for c in generate(b, reqs)]
        asyncio.run(b.close())
    assert outs["native"] == outs["vllm"] == outs["openai"]


def test_unknown_models_are_clear_errors(vllm_url):
    with pytest.raises(ModelError):
        make_backend("native", model="no-such-model")
    with pytest.raises(ModelError):
        make_backend("vllm", model="no-such-model")
    b = make_backend("openai", base_urls=[vllm_url], model="no-such-model")
    with pytest.raises(InvalidRequestError, match="not served"):
        generate(b, ["hi"])
    with pytest.raises(InvalidRequestError):
        make_backend("nope")


def test_scripted_backend_records_batches_and_fails_alone():
    b = ScriptedBackend({"a": "yes", "b": ["x", "y"], "c": RuntimeError("boom")})
    done = generate(b, [Request.make("a"), Request.make("b", n=3), Request.make("c")])
    assert done[0].text == "yes" and done[1].texts == ["x", "y", "x"]
    assert not done[2].ok and "boom" in done[2].error
    with pytest.raises(BackendError, match="boom"):
        done[2].text  # noqa: B018
    assert len(b.batches) == 1 and len(b.batches[0]) == 3
    assert b.usage.requests == 3 and b.usage.failed == 1 and b.usage.generated_tokens == 3 + 3


def test_native_caller_gets_its_result_while_another_still_runs(served_model_dir):
    """Continuous batching in the native backend: a short request sent next to a long one comes back first."""
    backend = build("native", served_model_dir, None)

    async def race() -> tuple[bool, int, int]:
        long = asyncio.ensure_future(backend.generate([greedy("Paris", 200)]))
        [short] = await backend.generate([greedy("12 + 30 =", 3)])
        running = not long.done()
        [done] = await long
        return running, len(done.token_ids), len(short.token_ids)

    assert asyncio.run(race()) == (True, 200, 3)
    asyncio.run(backend.close())


def test_native_drafter_switches_between_runs_and_not_during_one(served_model_dir):
    """`set_speculative` swaps the drafter in the worker thread: the same greedy tokens with and without drafts,
    the draft counters say which ran, and a switch while a request is in flight, or a bad config, is refused."""
    backend = build("native", served_model_dir, None)
    text = "one two three four five one two three four five one two three"
    eager = {"prompt_lookup_min": 1, "draft_threshold": 0.0, "cost_aware": False}  # drafts wherever a token recurs

    async def runs() -> None:
        await backend.set_speculative(eager)
        [drafted] = await backend.generate([greedy(text, 24)])
        await backend.set_speculative(None)
        [plain] = await backend.generate([greedy(text, 24)])
        assert plain.token_ids == drafted.token_ids
        assert drafted.draft_tokens > 0 and plain.draft_tokens == 0
        busy = asyncio.ensure_future(backend.generate([greedy("Paris", 200)]))
        await asyncio.sleep(0)  # its request is in the worker's inbox now, before the switch
        with pytest.raises(InvalidRequestError, match="only while the engine runs nothing"):
            await backend.set_speculative("prompt_lookup")
        await busy
        with pytest.raises(InvalidRequestError, match="speculative"):
            await backend.set_speculative({"num_speculative_tokens": 0})
        await backend.set_speculative(eager)
        [again] = await backend.generate([greedy(text, 24)])
        assert again.token_ids == drafted.token_ids and again.draft_tokens > 0

    asyncio.run(runs())
    asyncio.run(backend.close())


@pytest.mark.parametrize("kind", ["native", "vllm"])
def test_a_cancelled_caller_frees_the_engine(kind, served_model_dir):
    """A caller that goes away (a client disconnect in `fot serve`) takes its samples out of the engine: the engine
    goes idle at once instead of finishing them, and the next request is served."""
    backend = build(kind, served_model_dir, None)

    async def cancel_midway() -> tuple[int, Completion]:
        task = asyncio.ensure_future(backend.generate([greedy("Paris", 400), greedy("12 + 30 =", 400)]))
        while backend.usage.forward_passes < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        passes = backend.usage.forward_passes
        await asyncio.sleep(0.5)
        assert backend.usage.forward_passes == passes  # nothing runs on for the cancelled caller
        [after] = await backend.generate([greedy("Paris", 4)])
        return passes, after

    passes, after = asyncio.run(cancel_midway())
    assert passes < 300 and len(after.token_ids) == 4
    if kind == "native":
        assert backend.engine.stats.cancelled == 2 and backend.engine.idle
    asyncio.run(backend.close())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("kind", ["native", "vllm"])
def test_a_worker_that_stops_fails_its_callers_and_health_says_so(kind, served_model_dir, monkeypatch):
    """An error that escapes the worker's loop (here: building a finished request's result) stops the worker. Its
    waiting callers fail with the cause instead of waiting forever, later requests are refused at once, and
    `fot serve`'s /health answers 503."""
    backend = build(kind, served_model_dir, None)

    def lost(*_):
        raise RuntimeError("result lost")

    if kind == "native":
        monkeypatch.setattr(backend.engine, "result", lost)
    else:
        monkeypatch.setattr(fot.decoding.vllm, "_completion", lost)
    stopped = f"the {kind} backend stopped: RuntimeError: result lost"
    with pytest.raises(BackendError, match=stopped):
        asyncio.run(asyncio.wait_for(backend.generate([greedy("Paris", 4)]), 60))
    assert not backend.alive
    with pytest.raises(BackendError, match=stopped):
        generate(backend, [greedy("Paris", 4)])
    assert backend.usage.failed == backend.usage.requests == 2  # a batch that raised counts as failed

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_ready = time.monotonic() + 30
        while not server.started and time.monotonic() < wait_ready:
            time.sleep(0.05)
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert r.status_code == 503 and r.json()["status"] == "down" and stopped in r.json()["error"]
    finally:
        server.should_exit = True
        thread.join(30)
    asyncio.run(backend.close())


def test_a_last_assistant_message_is_continued(backend, served_model_dir):
    """A chat prompt that ends in an assistant message continues that message (how a repaired answer goes on): the
    same tokens as the chat template's text given as a plain prompt, on every backend (vLLM's server through its
    continue_final_message)."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "12 + 30 ="}, {"role": "assistant", "content": "The quick brown"}]
    text = AutoTokenizer.from_pretrained(served_model_dir).apply_chat_template(
        messages, continue_final_message=True, add_generation_prompt=False, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\nThe quick brown")
    chat, plain = generate(backend, [greedy(messages, 10), greedy(text, 10)])
    assert chat.token_ids == plain.token_ids and chat.prompt_tokens == plain.prompt_tokens


def test_a_vllm_sample_that_ended_abnormally_fails_its_request():
    """vLLM's `abort` and `error` endings were read as "stop": a cut-off sample counted as an answer."""
    from types import SimpleNamespace as Out

    from fot.decoding.vllm import _completion

    def finished(reason: str) -> Out:
        sample = Out(index=0, text="4", token_ids=[19], logprobs=None, finish_reason=reason)
        return Out(outputs=[sample], prompt_token_ids=[1, 2])

    assert _completion(finished("stop"), 2).texts == ["4", "4"]  # a greedy sample, copied for n=2
    for reason in ("abort", "error"):
        c = _completion(finished(reason), 1)
        assert not c.ok and f"finish reason {reason!r}" in c.error


def test_a_vllm_step_that_fails_takes_its_requests_out_of_the_engine(served_model_dir, monkeypatch):
    """The callers were failed, but their requests stayed in vLLM's scheduler and were stepped again, for nobody."""
    backend = build("vllm", served_model_dir, None)
    try:
        real, steps = backend.engine.step, []

        def counted():
            steps.append(1)
            return real()

        def broken():
            monkeypatch.setattr(backend.engine, "step", counted)  # it breaks once
            raise RuntimeError("step lost")

        monkeypatch.setattr(backend.engine, "step", broken)
        done = generate(backend, [greedy("Paris", 4), greedy("The quick brown fox", 4)])
        assert all(not c.ok and "vLLM failed: RuntimeError: step lost" in c.error for c in done)
        time.sleep(1.0)
        assert steps == [] and not backend.engine.has_unfinished_requests()  # nothing left to step
        assert all(c.ok for c in generate(backend, [greedy("Paris", 4)])) and steps  # and it serves on
    finally:
        asyncio.run(backend.close())


def test_a_native_backend_given_an_engine_refuses_options_that_would_build_one(served_model_dir):
    """`NativeBackend(engine=e, speculative="kangaroo")` served `e` with its own drafter and said nothing."""
    from fot.decoding.native import NativeBackend
    from fot.errors import InvalidRequestError
    from fot.speculative.engine import Engine

    engine = Engine.from_pretrained(served_model_dir, dtype="float32", max_batch=4)
    with pytest.raises(InvalidRequestError, match=r"\['max_batch', 'speculative'\] cannot apply to an engine="):
        NativeBackend({"max_batch": 8}, engine=engine, speculative="kangaroo")
    backend = NativeBackend(engine=engine, window=0.0)  # how it serves is its own
    try:
        assert generate(backend, [greedy("Paris", 4)])[0].ok
    finally:
        asyncio.run(backend.close())


@pytest.mark.parametrize("kind", ["native", "vllm"])
def test_close_finishes_what_is_in_flight_and_still_hears_a_cancelled_caller(kind, served_model_dir, monkeypatch):
    """vLLM's close() returned at once, failing the requests in flight with "backend is closed"; the native
    worker stopped reading its inbox while closing, so a caller cancelled meanwhile waited 30 s for its Drop.
    Each step is slowed to 20 ms, so that the long request is still running when it is cancelled."""
    backend = build(kind, served_model_dir, None)
    step = backend.engine.step
    monkeypatch.setattr(backend.engine, "step", lambda: time.sleep(0.02) or step())

    async def scenario() -> tuple[Completion, float]:
        running = asyncio.create_task(backend.generate([greedy("The quick brown fox", 48)]))
        doomed = asyncio.create_task(backend.generate([greedy("Paris", 450)]))
        await asyncio.sleep(0.5)  # both in the engine
        closing = asyncio.create_task(backend.close())
        await asyncio.sleep(0.1)
        doomed.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        waited = time.monotonic() - t0
        [done] = await running
        await closing
        return done, waited

    done, waited = asyncio.run(scenario())
    assert done.ok and len(done.token_ids) == 48  # finished, not failed by the close
    assert waited < 15  # its Drop was heard (the wait for one is 30 s)
    assert not backend.alive
