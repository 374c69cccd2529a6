"""Fault tests for the OpenAI backend against a real `vllm serve`, behind real misbehaving HTTP endpoints: down,
killed mid-run, answering 429/500, too slow. Every request completes by retry/fail-over or fails alone with a
clear error; nothing hangs (each test is bounded); every server is stopped."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from servers import fault_proxy, free_port

from fot.decoding import BackendError, Request, make_backend

REQUESTS = [Request.make(f"Count to {i}:", max_tokens=24, ignore_eos=True) for i in range(12)]


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def upstream(vllm_url: str) -> str:
    return vllm_url.removesuffix("/v1")


def run(backend, requests=REQUESTS):
    async def go():
        try:
            return await backend.generate(requests)
        finally:
            await backend.close()

    return asyncio.run(go())


def expected(vllm_url):
    return [c.token_ids for c in run(make_backend("openai", base_urls=[vllm_url]))]


def test_an_endpoint_that_is_down_is_skipped(vllm_url):
    dead = free_port()  # nothing listens there
    b = make_backend("openai", base_urls=[url(dead), vllm_url], backoff=0.05)
    done = run(b)
    assert all(c.ok for c in done)
    assert [c.token_ids for c in done] == expected(vllm_url)


def test_all_endpoints_down_is_a_clear_error_not_a_hang(vllm_url):
    b = make_backend("openai", base_urls=[url(free_port()), url(free_port())])
    t = time.monotonic()
    with pytest.raises(BackendError, match="no endpoint answered"):
        run(b)
    assert time.monotonic() - t < 30
    assert b.usage.requests == b.usage.failed == len(REQUESTS)  # were 0 and 0: /metrics showed no failure


def test_health_says_why_no_endpoint_serves():
    b = make_backend("openai", base_urls=[url(free_port())])
    assert asyncio.run(b.health()).startswith("no endpoint answered /models")


class ModelsOnly(BaseHTTPRequestHandler):
    """An endpoint whose /models lists a model and does not say its context."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_an_endpoint_that_does_not_say_its_context_is_warned_about():
    """Its prompts cannot be checked against the context before a search (the context was taken as unbounded,
    silently): the backend says so once, on connecting."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ModelsOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    b = make_backend("openai", base_urls=[url(server.server_port)])

    async def go() -> str | None:
        try:
            return await b.health()
        finally:
            await b.close()

    try:
        with pytest.warns(UserWarning, match="do not say the context of 'm'"):
            assert asyncio.run(go()) is None
    finally:
        server.shutdown()


def test_health_asks_the_upstream_each_time_once_connected():
    """Once connected, /health said ok while the upstream was gone (it asked nobody until a request failed)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ModelsOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    b = make_backend("openai", base_urls=[url(server.server_port)], model="m")

    async def go() -> tuple[str | None, str | None]:
        try:
            up = await b.health()
            server.shutdown()
            server.server_close()
            return up, await b.health()
        finally:
            await b.close()

    with pytest.warns(UserWarning, match="do not say the context"):
        up, gone = asyncio.run(go())
    assert up is None and gone.startswith("no endpoint answered /models")


def test_endpoint_killed_mid_run(vllm_url, tmp_path):
    ports = free_port(), free_port()
    with (
        fault_proxy(upstream(vllm_url), ports[0], tmp_path / "a.log", delay=5) as doomed,  # holds its requests
        fault_proxy(upstream(vllm_url), ports[1], tmp_path / "b.log"),
    ):
        b = make_backend("openai", base_urls=[url(p) for p in ports], backoff=0.05)
        threading.Timer(1.0, doomed.stop).start()  # dies with requests in flight
        done = run(b, REQUESTS * 3)
    assert all(c.ok for c in done), [c.error for c in done if not c.ok]
    assert [c.token_ids for c in done] == expected(vllm_url) * 3
    assert b.retries > 0  # some requests really were cut off and served again elsewhere


@pytest.mark.parametrize("status", [429, 500])
def test_429_and_500_are_retried(vllm_url, tmp_path, status):
    port = free_port()
    with fault_proxy(upstream(vllm_url), port, tmp_path / "p.log", fail_first=5, status=status):
        b = make_backend("openai", base_urls=[url(port)], backoff=0.05, max_retries=6)
        done = run(b)
    assert all(c.ok for c in done)
    assert [c.token_ids for c in done] == expected(vllm_url)
    assert b.retries == 5


def test_persistent_500_fails_each_request_alone_with_the_cause(vllm_url, tmp_path):
    port = free_port()
    with fault_proxy(upstream(vllm_url), port, tmp_path / "p.log", fail_first=10**6, status=500):
        b = make_backend("openai", base_urls=[url(port)], backoff=0.01, max_retries=2)
        done = run(b, REQUESTS[:3])
    assert not any(c.ok for c in done)
    assert all("HTTP 500" in c.error and "3 attempts" in c.error for c in done)
    assert b.usage.failed == 3


def test_request_timeout_fails_over_to_a_fast_endpoint(vllm_url, tmp_path):
    ports = free_port(), free_port()
    with (
        fault_proxy(upstream(vllm_url), ports[0], tmp_path / "slow.log", delay=30),
        fault_proxy(upstream(vllm_url), ports[1], tmp_path / "fast.log"),
    ):
        b = make_backend("openai", base_urls=[url(p) for p in ports], timeout=5.0, backoff=0.05)
        t = time.monotonic()
        done = run(b)
        assert time.monotonic() - t < 60
    assert all(c.ok for c in done)
    assert [c.token_ids for c in done] == expected(vllm_url)


def test_timeout_with_nowhere_to_go_fails_alone(vllm_url, tmp_path):
    port = free_port()
    with fault_proxy(upstream(vllm_url), port, tmp_path / "slow.log", delay=30):
        b = make_backend("openai", base_urls=[url(port)], timeout=1.0, backoff=0.01, max_retries=1)
        done = run(b, REQUESTS[:2])
    assert all(not c.ok and "timed out" in c.error for c in done)


def test_a_request_the_server_rejects_fails_alone(vllm_url):
    long_prompt = "fox " * 2000  # over the served context of 512 tokens: HTTP 400, not retried
    b = make_backend("openai", base_urls=[vllm_url])
    done = run(b, [REQUESTS[0], Request.make(long_prompt, max_tokens=8), REQUESTS[1]])
    assert done[0].ok and done[2].ok
    assert not done[1].ok and "HTTP 400" in done[1].error
    assert b.retries == 0


def test_a_search_whose_prompts_would_overflow_the_server_fails_before_any_generation(vllm_url, tmp_path):
    """The OpenAI backend counts the search's longest prompt with the server's /tokenize (the served context is 512
    tokens); a server that cannot count is warned about once, and the search runs unchecked."""
    from fot.errors import InvalidRequestError
    from fot.forest import solve

    big, small = {"mctsr": {"rollouts": 1, "max_tokens": 200}}, {"mctsr": {"rollouts": 1, "max_tokens": 40}}
    b = make_backend("openai", base_urls=[vllm_url])
    with pytest.raises(InvalidRequestError, match=r"longest request .* would not fit: prompt \+ max_tokens = \d+"):
        solve("What is 40 + 2?", backend=b, method="mctsr", config=big)
    assert b.usage.requests == 0  # nothing was generated
    assert solve("What is 40 + 2?", backend=b, method="mctsr", config=small).usage.requests > 0
    assert not b.uncounted

    port = free_port()
    with fault_proxy(upstream(vllm_url), port, tmp_path / "p.log", fail_first=1, status=404):  # its /tokenize
        b = make_backend("openai", base_urls=[url(port)])
        with pytest.warns(UserWarning, match="could not count a prompt .*HTTPStatusError.*404"):
            assert solve("What is 40 + 2?", backend=b, method="mctsr", config=small).usage.requests > 0
    assert b.uncounted


class RateLimited(BaseHTTPRequestHandler):
    """Answers its first completion with 429 and `Retry-After: <wait>`, then with a completion; keeps the times."""

    seen: list[float] = []
    wait = "1"

    def do_GET(self) -> None:
        self.reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 512}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(time.monotonic())
        if len(self.seen) == 1:
            self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": self.wait})
        else:
            usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
            self.reply(200, {"choices": [{"index": 0, "text": "4", "finish_reason": "stop"}], "usage": usage})

    def reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class ModelsAndAnswers(RateLimited):
    """Never rate-limits: every completion is answered."""

    seen: list[float] = [0.0]  # as if its first request had been refused already


def test_a_retry_waits_as_long_as_retry_after_asks():
    """A 429's Retry-After was ignored: the back-off (about 4 s over 4 retries) ran out against a server that asked
    for more, and the search failed."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RateLimited)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        b = make_backend("openai", base_urls=[url(server.server_port)], backoff=0.01, max_retries=1)
        [done] = run(b, [Request.make("2 + 2 =", max_tokens=1)])
    finally:
        server.shutdown()
    first, second = RateLimited.seen
    assert done.ok and done.text == "4" and b.retries == 1
    assert second - first >= 0.9  # not the 0.01 s back-off: the second of Retry-After


def test_a_retry_after_does_not_hold_a_request_another_endpoint_can_take():
    """A 429's Retry-After of a minute held the retry back although a second endpoint was free, and marked the
    endpoint down, so /health said 503 after one 429."""

    class Busy(RateLimited):
        seen: list[float] = []
        wait = "60"

    busy, free = (ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Busy, ModelsAndAnswers))
    for s in (busy, free):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:  # the deadline is far below the minute asked for: waiting it out would fail the request
        b = make_backend("openai", base_urls=[url(busy.server_port), url(free.server_port)], model="m", deadline=20)

        async def go():
            try:
                [done] = await b.generate([Request.make("2 + 2 =", max_tokens=1)])
                return done, await b.health()
            finally:
                await b.close()

        done, health = asyncio.run(go())
    finally:
        busy.shutdown()
        free.shutdown()
    assert done.ok and done.text == "4" and len(Busy.seen) == 1 and b.retries == 1
    assert health is None  # asked to wait is not down
