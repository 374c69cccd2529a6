"""`fot serve` as users reach it: a real server process on loopback, driven by the official `openai` client (sync,
async, streaming) and by raw HTTP for the error cases, on the tiny model; and in proxy mode in front of a real
`vllm serve`."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import Process, fault_proxy, free_port

KEY = "test-key-1"
PROBLEM = "Tom has 3 boxes with 12 apples in each box. He eats 5 apples. How many apples are left?"
# ~30 s of search on the tiny model: long enough to be cut off mid-search
LONG = {"trees": 16, "mctsr": {"rollouts": 32, "max_tokens": 40}, "early_stop": False, "sparse": {"enabled": False}}


def start(log: Path, *options: str, ready: str = "/health") -> tuple[Process, str]:
    port = free_port()
    argv = [sys.executable, "-m", "fot.cli", "serve", "--port", str(port), *options]
    server = Process(argv, log)
    server.wait_ready(f"http://127.0.0.1:{port}{ready}", timeout=180)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory):
    """Keys required; small searches so each request takes a second or two."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    options = ["--model", str(served_model_dir), "--trees", "2", "--rollouts", "1", "--max-tokens", "24"]
    proc, url = start(log, *options, "--api-key", KEY, "--api-key", "second-key")
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def small_server(served_model_dir, tmp_path_factory):
    """One search at a time, no queue, a 4 s deadline: for 429, 504 and disconnects."""
    log = tmp_path_factory.mktemp("serve") / "serve-small.log"
    options = ["--model", str(served_model_dir), "--max-running", "1", "--max-queue", "0", "--deadline", "4"]
    proc, url = start(log, *options)
    yield url, log
    proc.stop()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip


def client(url: str, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, **{"max_retries": 0} | kw)


def test_sync_client_gets_an_answer_with_usage_and_the_forest(server):
    c = client(server)
    assert [m.id for m in c.models.list()][:3] == ["fot", "fot-2", "fot-4"]
    done = c.chat.completions.create(model="fot-2", messages=[{"role": "user", "content": PROBLEM}])
    forest = done.model_extra["fot"]
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason == "stop" and forest["trees"] == 2 and forest["method"] == "fot"
    if forest["answer"] is not None:
        assert done.choices[0].message.content == forest["answer"]
    assert forest["decision"] in ("majority", "plurality", "expert", "fallback")
    # usage sums every internal call of the search: the stored solution says the same
    stored = httpx.get(f"{server}/v1/solutions/{forest['solution_id']}", headers={"Authorization": f"Bearer {KEY}"})
    u = stored.json()["usage"]
    assert done.usage.prompt_tokens == u["prompt_tokens"] > 0 and done.usage.completion_tokens == u["generated_tokens"]
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert forest["requests"] == u["requests"] >= 5  # first answers, grades, a rollout: many calls, one reply
    assert forest["repairs"] == stored.json()["repairs"] and forest["arithmetic_repairs"] == u["arithmetic_repairs"]
    page = httpx.get(f"{server}{forest['view']}", headers={"Authorization": f"Bearer {KEY}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count('class="node') == sum(len(t["nodes"]) for t in stored.json()["trees"])
    # store=False: the problem and its trees are not kept for /v1/solutions
    done = c.chat.completions.create(model="cot", messages=[{"role": "user", "content": PROBLEM}], store=False)
    assert done.model_extra["fot"]["view"] is None
    stored = httpx.get(f"{server}/v1/solutions/{done.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert stored.status_code == 404


def test_options_in_the_body_and_the_second_key(server):
    c = client(server, key="second-key")
    done = c.chat.completions.create(
        model="sc-3", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM}],
        seed=7, max_tokens=16, extra_body={"fot": {"task": "math", "sc_temperature": 0.5}},
    )  # fmt: skip
    forest = done.model_extra["fot"]
    assert forest["method"] == "sc" and len(forest["tree_answers"]) == 3 and forest["trees"] == 0
    game = c.chat.completions.create(model="tot", messages=[{"role": "user", "content": "4 6 1 10"}])
    assert game.model_extra["fot"]["task"] == "game24" and game.model_extra["fot"]["method"] == "tot"


def test_async_clients_at_once_share_the_backend(server):
    async def run() -> list:
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        questions = [f"What is {i} + {i}?" for i in range(4)]
        return await asyncio.gather(
            *(c.chat.completions.create(model="fot-2", messages=[{"role": "user", "content": q}]) for q in questions)
        )

    before = metrics(server)
    replies = asyncio.run(run())
    after = metrics(server)
    assert len({r.id for r in replies}) == 4 and all(r.usage.completion_tokens > 0 for r in replies)
    assert after["fot_requests_total{200}"] - before.get("fot_requests_total{200}", 0) == 4
    assert after["fot_completion_tokens_total"] - before["fot_completion_tokens_total"] == sum(
        r.usage.completion_tokens for r in replies
    )
    assert after["fot_request_seconds_count"] - before["fot_request_seconds_count"] == 4
    assert after["fot_backend_forward_passes_total"] > before["fot_backend_forward_passes_total"]
    assert after["fot_queue_depth"] == 0 and after["fot_running_searches"] == 0
    assert after["fot_accepted_tokens_total"] <= after["fot_draft_tokens_total"]


def test_streaming_sends_progress_then_the_answer_then_usage(server):
    c = client(server)
    chunks = list(
        c.chat.completions.create(
            model="fot-2", messages=[{"role": "user", "content": PROBLEM}], stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    progress = [
        ch.model_extra["fot"] for ch in chunks if (ch.model_extra or {}).get("fot", {}).get("event") == "progress"
    ]
    assert progress and progress[0]["step"] == 0 and all(p["trees"] == 2 for p in progress)
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason == "stop"]
    assert len(final) == 1 and final[0].model_extra["fot"]["event"] == "done"
    answer = final[0].model_extra["fot"]["answer"]
    assert text == (answer if answer is not None else "No answer: the fot search reached none.")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0  # include_usage: the last chunk
    quiet = list(c.chat.completions.create(model="cot", messages=[{"role": "user", "content": PROBLEM}], stream=True))
    assert all(ch.usage is None for ch in quiet)


def test_keys_are_required(server):
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, key=key or "x").chat.completions.create(
                model="fot", messages=[{"role": "user", "content": "1+1"}]
            )
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "fot", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # health and metrics need no key
    assert httpx.get(f"{server}/metrics").status_code == 200


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "1+1"}]}, 400, "unknown model"),
        ({"model": "mctsr-4", "messages": [{"role": "user", "content": "1+1"}]}, 400, "unknown model"),
        ({"model": "fot-99", "messages": [{"role": "user", "content": "1+1"}]}, 400, "1..64"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1+1"}], "temperature": 1}, 400, "temperature"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1+1"}], "n": 2}, 400, "n"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1+1"}], "fot": {"trees": 0}}, 400, "trees"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1+1"}], "fot": {"bogus": 1}}, 400, "bogus"),
        ({"model": "fot-2", "messages": [{"role": "user", "content": "1+1"}], "fot": {"trees": 3}}, 400, "contradicts"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1+1"}], "fot": {"task": "chess"}}, 400, "task"),
        ({"model": "tot", "messages": [{"role": "user", "content": "What is 1+1?"}]}, 400, "does not fit"),
        ({"model": "fot", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        ({"model": "fot", "messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
        ({"model": "fot", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ({"model": "fot", "messages": []}, 400, "messages"),
        ({"model": "fot", "messages": [{"role": "user", "content": "1"}] * 65}, 400, "at most 64"),
        ({"messages": [{"role": "user", "content": "1+1"}]}, 400, "model"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_requests_get_400_in_openai_shape_before_any_work(server, body, status, words):
    before = metrics(server)["fot_backend_requests_total"]
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error" and set(error) == {
        "message", "type", "param", "code"}  # fmt: skip
    assert "Traceback" not in r.text
    assert metrics(server)["fot_backend_requests_total"] == before


def test_other_errors_keep_the_openai_shape(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"x" * 1_000_001, headers=auth)
    assert r.status_code == 413 and "over 1000000 bytes" in r.json()["error"]["message"]
    for path in ("/v1/nope", "/v1/solutions/chatcmpl-unknown", "/v1/solutions/chatcmpl-unknown/view"):
        r = httpx.get(f"{server}{path}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="fot", messages=[{"role": "user", "content": "1+1"}], n=3)


def long_request(url: str, timeout: float, stream: bool = False) -> None:
    body = {"model": "fot", "messages": [{"role": "user", "content": PROBLEM}], "fot": LONG, "stream": stream}
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
            for _ in r.iter_bytes():
                if time.monotonic() - t0 > timeout:
                    return  # chunks keep coming, but the client has seen enough: it hangs up
    except httpx.ReadTimeout:  # the client gives up and closes the connection
        pass


def wait_for(check, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True])
def test_busy_server_answers_429_and_a_disconnect_cancels_the_search(small_server, stream):
    url, log = small_server
    cancelled = metrics(url).get("fot_cancelled_searches_total", 0)
    first = threading.Thread(target=long_request, args=(url, 2.0, stream))
    first.start()
    wait_for(lambda: metrics(url)["fot_running_searches"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client(url).chat.completions.create(model="cot", messages=[{"role": "user", "content": PROBLEM}])
    assert int(e.value.response.headers["Retry-After"]) >= 1 and e.value.body["code"] == "server_busy"
    first.join()
    # the client hung up: its search is cancelled, its samples leave the engine, and the engine stops
    wait_for(lambda: metrics(url)["fot_cancelled_searches_total"] == cancelled + 1)
    wait_for(lambda: metrics(url)["fot_running_searches"] == 0)
    seen = metrics(url)  # the hang-up counts as a 499, and its tokens count in the backend's totals
    assert seen["fot_requests_total{499}"] == cancelled + 1
    assert seen["fot_backend_generated_tokens_total"] > seen.get("fot_completion_tokens_total", 0)
    passes = metrics(url)["fot_backend_forward_passes_total"]
    time.sleep(1.0)
    assert metrics(url)["fot_backend_forward_passes_total"] == passes
    quick = client(url).chat.completions.create(
        model="cot", messages=[{"role": "user", "content": "What is 1+1?"}], max_tokens=16
    )  # short: well inside the 4 s deadline on a loaded machine too
    assert quick.choices[0].message.content
    assert "Traceback" not in log.read_text()


def test_a_search_past_the_deadline_gets_504(small_server):
    url, _ = small_server
    body = {"model": "fot", "messages": [{"role": "user", "content": PROBLEM}], "fot": LONG}
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["x-should-retry"] == "false"  # the openai client ran the whole search three times
    assert time.monotonic() - t0 < 15
    wait_for(lambda: metrics(url)["fot_running_searches"] == 0)


def test_a_client_gone_while_sending_its_body_is_a_499(small_server):
    """It raised ClientDisconnect out of the app: a traceback in the log, and no count."""
    import socket

    url, log = small_server
    before = metrics(url).get("fot_requests_total{499}", 0)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
    wait_for(lambda: metrics(url).get("fot_requests_total{499}", 0) == before + 1)
    assert "ClientDisconnect" not in log.read_text()


def test_proxy_mode_in_front_of_vllm_serve(vllm_url, tmp_path):
    proc, url = start(tmp_path / "proxy.log", "--backend", "openai", "--base-url", vllm_url, "--model", "tiny",
                      "--trees", "2", "--rollouts", "1", "--max-tokens", "24")  # fmt: skip
    with proc:
        done = client(url).chat.completions.create(model="fot-2", messages=[{"role": "user", "content": PROBLEM}])
        assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
        assert done.model_extra["fot"]["requests"] >= 5


def test_a_backend_that_is_down_gets_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proc, url = start(tmp_path / "down.log", "--backend", "openai", "--base-url", dead, "--timeout", "5",
                      ready="/v1/models")  # fmt: skip
    with proc:
        health = httpx.get(f"{url}/health")  # a load balancer sends nothing here meanwhile
        assert health.status_code == 503 and health.json()["error"].startswith("no endpoint answered /models")
        with pytest.raises(openai.InternalServerError) as e:
            client(url).chat.completions.create(model="cot", messages=[{"role": "user", "content": PROBLEM}])
        assert e.value.status_code == 503 and e.value.body["code"] == "backend_unavailable"
        assert "Traceback" not in proc.tail(200)


def test_a_search_the_upstream_refuses_gets_502_that_the_openai_client_does_not_retry(vllm_url, tmp_path):
    """An upstream's 4xx used to be a 503, which the openai client asked again, to be refused again."""
    port = free_port()
    with fault_proxy(vllm_url.removesuffix("/v1"), port, tmp_path / "p.log", fail_first=10**6, status=400):
        proc, url = start(tmp_path / "refused.log", "--backend", "openai", "--base-url",
                          f"http://127.0.0.1:{port}/v1", "--model", "tiny", "--max-tokens", "24")  # fmt: skip
        with proc:
            retrying = client(url, max_retries=2)
            with pytest.raises(openai.APIStatusError) as e:
                retrying.chat.completions.create(model="cot", messages=[{"role": "user", "content": PROBLEM}])
            assert e.value.status_code == 502 and e.value.body["code"] == "backend_refused"
            assert "HTTP 400" in e.value.body["message"]
            seen = metrics(url)
            assert seen["fot_requests_total{502}"] == 1  # asked once, not three times
            assert seen["fot_backend_failed_requests_total"] >= 1 and seen["fot_backend_retries_total"] == 0


def test_request_options_merge_into_the_server_defaults():
    from fot.chat import ApiError, ChatRequest, make_job

    defaults = {"trees": 4, "mctsr": {"rollouts": 1, "max_tokens": 24}}
    body = ChatRequest(
        model="fot-2", messages=[{"role": "user", "content": "What is 2+2?"}], fot={"mctsr": {"rollouts": 3}}
    )
    job = make_job(body, defaults)
    assert (job.config.trees, job.config.mctsr.rollouts, job.config.mctsr.max_tokens) == (2, 3, 24)
    job = make_job(body.model_copy(update={"max_tokens": 50, "seed": 9}), defaults)
    assert (job.config.mctsr.max_tokens, job.config.seed, job.task) == (50, 9, "math")
    puzzle = ChatRequest(model="fot-2", messages=[{"role": "user", "content": "4 6 1 10"}], max_tokens=16)
    tot = make_job(puzzle, defaults).config.tot  # Game of 24's ToT took no budget from max_tokens
    assert (tot.propose_tokens, tot.value_tokens) == (16, 16)
    with pytest.raises(ApiError, match="less than or equal to 64"):  # a request's n, found mid-search before
        make_job(body.model_copy(update={"fot": {"mctsr": {"reward_samples": 2000}}}), defaults)


@pytest.mark.parametrize(
    "options, words",
    [
        (["--max-running", "0"], "max_running"),
        (["--trees", "0"], "trees"),
        (["--deadline", "-1"], "deadline"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url names endpoints of the openai backend"),
        (["--port", "70000"], "a port is 0-65535"),  # getaddrinfo took it as port 4464
    ],
)
def test_bad_server_options_fail_before_a_model_loads(options, words):
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "fot.cli", "serve", *options], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "fot: error:" in done.stderr and words in done.stderr


def test_a_taken_port_or_a_model_the_upstream_does_not_serve_is_an_error_at_start(vllm_url):
    """The port was bound only after the model loaded (minutes, then uvicorn's own exit), and an upstream model
    that was not served made every request a 400 that blamed the client's prompt."""
    import socket
    import subprocess

    serve = [sys.executable, "-m", "fot.cli", "serve"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = [*serve, "--port", port, "--model", "/no/such/model"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr  # before the model
    argv = [*serve, "--port", str(free_port()), "--backend", "openai", "--base-url", vllm_url, "--model", "typo"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "model 'typo' is not served; the endpoints serve ['tiny']" in done.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_ctrl_c_cancels_a_long_search_after_the_grace(stream, served_model_dir, tmp_path):
    """uvicorn waited for every search in flight (up to --deadline, 600 s) before it stopped, and a forced stop
    skipped closing the backend. A stream has sent its 200, and its cut connection read as a quiet end: it now
    ends with an error event its client reads, just before the grace runs out."""
    import signal

    from fot.server import SHUTDOWN_GRACE_S, STREAM_NOTICE_S

    proc, url = start(tmp_path / "stop.log", "--model", str(served_model_dir))
    with proc:
        messages, options = [{"role": "user", "content": PROBLEM}], {"fot": LONG | {"trees": 64}}
        replies: list = []

        def ask() -> None:
            if not stream:
                body = {"model": "fot", "messages": messages, **options}
                replies.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600))
                return
            try:
                chunks = client(url, timeout=600).chat.completions.create(
                    model="fot", messages=messages, stream=True, extra_body=options
                )
                replies.append(list(chunks))
            except openai.APIError as e:
                replies.append(e)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        wait_for(lambda: metrics(url)["fot_running_searches"] == 1)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        proc.proc.wait(timeout=SHUTDOWN_GRACE_S + 50)
        stopped = time.monotonic() - t0
        thread.join(timeout=30)
    assert proc.proc.returncode == 0 and "Application shutdown complete" in proc.tail(50)
    assert "Traceback" not in proc.tail(200)
    [r] = replies  # the client is told, not left with a dropped connection
    if stream:
        assert isinstance(r, openai.APIError) and r.body["code"] == "shutting_down", r
        assert SHUTDOWN_GRACE_S - STREAM_NOTICE_S <= stopped  # the search had its grace
    else:
        assert SHUTDOWN_GRACE_S <= stopped and "timeout graceful shutdown exceeded" in proc.tail(50)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_health_shows_its_cause_only_with_a_key_and_deep_json_is_a_400():
    """/health's 503 named the upstreams (hosts, ports, errors) to anyone; a body nested 50,000 deep was a 500
    (a client gone mid-body: `test_a_client_gone_while_sending_its_body_is_a_499`)."""
    from fastapi.testclient import TestClient

    from fot.decoding.scripted import ScriptedBackend
    from fot.server import ServeConfig, create_app

    class Down(ScriptedBackend):
        async def health(self) -> str:
            return "no endpoint answered /models: http://10.1.2.3:1/v1: ConnectError"

    with TestClient(create_app(Down([]), ServeConfig(api_keys=["k"]))) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "down" and "error" not in r.json()
        r = http.get("/health", headers={"Authorization": "Bearer k"})
        assert r.status_code == 503 and "10.1.2.3" in r.json()["error"]
        assert http.get("/metrics").status_code == 200  # scrapers send no key
        deep = b"[" * 50_000 + b"]" * 50_000
        r = http.post("/v1/chat/completions", content=deep, headers={"Authorization": "Bearer k"})
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_the_server_starts_math_verify_before_its_first_request():
    """The worker's start (importing sympy: seconds) came inside the first math vote, blocking the event loop."""
    from fastapi.testclient import TestClient

    import fot.tasks.math as math_task
    from fot.decoding.scripted import ScriptedBackend
    from fot.server import create_app

    math_task._verifier._stop()
    with TestClient(create_app(ScriptedBackend([]))):
        assert math_task._verifier.proc is not None and math_task._verifier.proc.poll() is None


def test_the_store_of_recent_solutions_is_bounded_by_their_text_too():
    """It kept 256 solutions whatever their size: 64-tree searches of long answers could fill the memory."""
    from fot.chat import ApiError
    from fot.forest import Solution, SolveUsage
    from fot.server import Store

    def solution(chars: int) -> Solution:
        tree = {"nodes": [{"id": 0, "text": "x" * chars}], "edges": []}
        return Solution(problem="p", task="math", method="fot", answer="1", votes={"1": 1}, confidence=1.0,
                        decision="single", tree_answers=["1"], trees=[tree], usage=SolveUsage())  # fmt: skip

    store = Store(size=10, max_chars=100)
    for key in ("a", "b", "c"):
        store.put(key, solution(40))
    assert list(store.items) == ["b", "c"] and store.chars == 82  # 3 x 41 chars would pass 100: the oldest goes
    store.put("big", solution(500))
    assert list(store.items) == ["big"] and store.get("big").answer == "1"  # the newest stays, whatever its size
    with pytest.raises(ApiError, match="no solution 'a'"):
        store.get("a")


def test_a_stream_whose_client_is_gone_before_its_first_byte_gives_its_place_back():
    """The queue ticket was given back only by the stream's body, which never runs when sending the response's
    start fails: each such client kept a place in the queue for good, until the server answered only 429."""
    from starlette.requests import ClientDisconnect

    from fot.server import Admission, TicketedStream

    admission = Admission(running=1, queue=0)
    ticket = admission.ticket()

    async def body():
        ticket.owned = True
        yield "never sent"

    async def gone(message) -> None:
        raise OSError("the client went away")

    async def nothing():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        asyncio.run(TicketedStream(body(), ticket)(scope, nothing, gone))
    assert (admission.waiting, admission.active, ticket.state) == (0, 0, "done")
    admission.ticket()  # the place is free again
