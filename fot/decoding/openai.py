"""OpenAI-compatible servers behind the Backend contract: how a search scales past one machine.

Point it at one or many `vllm serve` endpoints. Each endpoint has its own throttle (requests per period) and
concurrency limit; a request goes to the healthy endpoint with the fewest requests in flight. Timeouts, refused
connections, 429 and 5xx are retried with exponential backoff on another endpoint where there is one; an endpoint
that refuses connections is skipped for `down_for` seconds. Other 4xx answers (a prompt over the context, say) are
the request's own fault: it fails alone at once, with the server's message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import random
import time
import warnings
from collections.abc import Sequence

import httpx
from asyncio_throttle import Throttler
from pydantic import BaseModel, ConfigDict, Field

from fot.config import SamplingParams
from fot.decoding.base import BackendError, BaseBackend, Completion, Output, Request, check_context, distinct_samples
from fot.errors import ContextOverflowError, FotError, InvalidRequestError

RETRYABLE = {408, 429, 500, 502, 503, 504}
ABNORMAL = {"abort", "error", "content_filter", "tool_calls", "function_call"}  # finish reasons that are no answer


class OpenAIConfig(BaseModel):
    """`base_urls` like "http://host:8000/v1". `model` None -> the one model the first endpoint serves. The API
    key is read from the environment variable named by `api_key_env` (vLLM ignores it unless started with one).
    Every request ends by `deadline` seconds, answered or failed: a server that sends a byte now and then never
    trips the read `timeout`, but it does trip the deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_urls: list[str] = Field(min_length=1)
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    rate_limit: int = Field(100, ge=1)  # requests per `period` seconds, per endpoint
    period: float = Field(1.0, gt=0)
    max_concurrency: int = Field(64, ge=1)  # requests in flight per endpoint
    timeout: float = Field(120.0, gt=0)  # seconds without a byte from the server (httpx's read timeout)
    deadline: float = Field(900.0, gt=0)  # seconds for a whole request, retries and back-off included
    max_retries: int = Field(4, ge=0)
    backoff: float = Field(0.25, ge=0)  # first retry delay; doubles each retry, capped at 8 s
    down_for: float = Field(5.0, ge=0)


class _Endpoint:
    def __init__(self, url: str, config: OpenAIConfig):
        self.url = url.rstrip("/")
        self.throttle = Throttler(rate_limit=config.rate_limit, period=config.period)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.in_flight = 0
        self.down_until = 0.0  # failed: rests until then (and /health counts it down)
        self.retry_at = 0.0  # up, but asked us to wait (Retry-After) until then

    def free_at(self) -> float:
        return max(self.down_until, self.retry_at)


class _Retry(Exception):
    """A failure worth retrying elsewhere (timeout, connection, 429, 5xx); `after`: the seconds the server asked
    for (Retry-After), if it did."""

    def __init__(self, message: str, after: float = 0.0):
        super().__init__(message)
        self.after = after


class OpenAIBackend(BaseBackend):
    name = "openai"

    def __init__(self, config: OpenAIConfig | dict | None = None, **options):
        super().__init__()
        self.config = c = self.parse_config(OpenAIConfig, config, options)
        self.model: str | None = c.model
        self._loop: asyncio.AbstractEventLoop | None = None
        self.context: int | None = None
        self.uncounted = False  # the server could not count a prompt: no more asking
        self.retries = 0  # attempts that failed and were retried, over the backend's lifetime

    async def generate(self, requests: Sequence[Request | str]) -> list[Completion]:
        try:
            await self.connect()
        except BackendError:  # no endpoint answers: these requests failed, and count so in the usage
            self.usage.requests += len(requests)
            self.usage.failed += len(requests)
            raise
        return await super().generate(requests)

    def _bind(self) -> None:
        """HTTP connections and semaphores belong to one event loop: make them anew when called from another
        (a script that calls `run_sync` twice runs two loops)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        c = self.config
        self._loop = loop
        self.endpoints = [_Endpoint(u, c) for u in c.base_urls]
        key = os.environ.get(c.api_key_env, "")
        exposed = [u for u in c.base_urls if key and not is_private(u)]
        if exposed:
            warnings.warn(f"fot: {c.api_key_env} is sent in clear text to {', '.join(exposed)}", stacklevel=3)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=c.timeout, limits=httpx.Limits(max_connections=None))

    async def connect(self) -> None:
        """Ask the endpoints what they serve (once): an unknown model is an error before any work."""
        self._bind()
        if self.context is not None:
            return
        served = await self.served(10.0)
        if self.model is None:
            self.model = next(iter(served))
        if self.model not in served:
            raise InvalidRequestError(f"model {self.model!r} is not served; the endpoints serve {sorted(served)}")
        self.context = served[self.model] or 1 << 30
        if not served[self.model]:
            warnings.warn(
                f"fot: the endpoints do not say the context of {self.model!r} (max_model_len), so prompts are not "
                "checked against it before the search",
                stacklevel=2,
            )

    async def served(self, timeout: float) -> dict[str, int | None]:
        """What the first endpoint that answers /models serves (model -> its context, if said); one that does not
        answer rests, and none answering is a BackendError."""
        errors = []
        for ep in self.endpoints:
            try:
                r = await self.client.get(f"{ep.url}/models", timeout=min(self.config.timeout, timeout))
                r.raise_for_status()
                return {m["id"]: m.get("max_model_len") for m in r.json()["data"]}
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
                ep.down_until = time.monotonic() + self.config.down_for
                errors.append(f"{ep.url}: {type(e).__name__}: {e}")
        raise BackendError("no endpoint answered /models: " + "; ".join(errors))

    async def health(self) -> str | None:
        """Down while every endpoint rests after a failure (asking none of them, so that the answer is quick), or
        while none answers /models now (asked at each call: once connected, a dead upstream must not read as up)."""
        self._bind()
        now = time.monotonic()
        if all(ep.down_until > now for ep in self.endpoints):
            return f"every endpoint failed within the last {self.config.down_for:g} s"
        try:
            if self.context is None:
                await self.connect()  # which asks /models
            else:
                await self.served(5.0)
        except FotError as e:
            return str(e)
        return None

    def prepare(self, request: Request) -> None:
        if self.context is not None and request.params.max_tokens >= self.context:  # known once connected
            raise ContextOverflowError(f"max_tokens {request.params.max_tokens} >= the context of {self.context}")

    async def admit(self, request: Request) -> None:
        """`prepare`'s check, then the prompt counted by the server's `/tokenize` (vLLM's) against the context."""
        await self.connect()
        self.prepare(request)
        count = await self.count_prompt(request)
        if count is not None:
            check_context(count, request, self.context)

    async def count_prompt(self, request: Request) -> int | None:
        """The prompt's tokens as the server counts them, or None where it cannot say, with a warning. A server
        without `/tokenize` (404, 405, 501) is not asked again; after another failure the next prompt is."""
        if self.uncounted:
            return None
        ep = self._pick(set())
        url = ep.url.removesuffix("/v1") + "/tokenize"
        try:
            r = await self.client.post(url, json={"model": self.model} | self.prompt_fields(request)[1])
            r.raise_for_status()
            return int(r.json()["count"])
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            status = e.response.status_code if isinstance(e, httpx.HTTPStatusError) else None
            self.uncounted = status in (404, 405, 501)
            warnings.warn(
                f"fot: {url} could not count a prompt ({type(e).__name__}: {str(e)[:200]}), so it is not checked "
                "against the context before the search",
                stacklevel=2,
            )
            return None

    async def _generate(self, requests: list[Request], prepared: list) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    @staticmethod
    def prompt_fields(request: Request) -> tuple[str, dict]:
        """The endpoint and the fields that carry the prompt, for a completion and for `/tokenize` alike."""
        if isinstance(request.prompt, str):
            return "/completions", {"prompt": request.prompt}
        fields: dict = {"messages": request.prompt}
        if request.prompt[-1]["role"] == "assistant":  # continue that message (vLLM's extension), as encode_prompt
            fields |= {"continue_final_message": True, "add_generation_prompt": False}
        return "/chat/completions", fields

    def body(self, request: Request) -> tuple[str, dict]:
        p = request.params
        path, body = self.prompt_fields(request)
        body |= {
            "model": self.model,
            "n": distinct_samples(p),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "return_token_ids": True,  # vLLM's extension; other servers ignore it
        }
        body |= {"stop": list(p.stop)} if p.stop else {}
        body |= {"seed": p.seed} if p.seed is not None else {}
        body |= {"top_k": p.top_k} if p.top_k else {}
        body |= {"ignore_eos": True} if p.ignore_eos else {}
        if path == "/completions":
            return path, body | ({"logprobs": 0} if p.logprobs else {})
        return path, body | {"logprobs": p.logprobs}

    async def _one(self, request: Request) -> Completion:
        try:
            async with asyncio.timeout(self.config.deadline):
                return await self._attempts(request)
        except TimeoutError:
            return Completion(error=f"no answer within the deadline of {self.config.deadline:g} s (retries included)")

    async def _attempts(self, request: Request) -> Completion:
        path, body = self.body(request)
        tried: list[str] = []
        failed_on: set[_Endpoint] = set()
        for attempt in range(self.config.max_retries + 1):
            ep = self._pick(failed_on)
            try:
                return _completion(await self._post(ep, path, body), request.params)
            except _Retry as e:
                tried.append(f"{ep.url}: {e}")
                failed_on.add(ep)
                if attempt == self.config.max_retries:
                    break
                self.retries += 1
                delay = min(8.0, self.config.backoff * 2**attempt) * (0.5 + random.random())
                elsewhere = any(x.free_at() <= time.monotonic() for x in self.endpoints if x is not ep)
                await asyncio.sleep(delay if elsewhere else max(delay, e.after))  # the deadline bounds a long wait
            except BackendError as e:  # the request's own fault: no retry
                return Completion(error=str(e), refused=True)
        return Completion(error=f"failed after {len(tried)} attempts: " + "; ".join(tried))

    def _pick(self, failed_on: set[_Endpoint]) -> _Endpoint:
        """The healthy endpoint with the fewest requests in flight, preferring those this request has not failed
        on yet; if all are marked down, the one that comes back first."""
        now = time.monotonic()
        healthy = [e for e in self.endpoints if e.free_at() <= now]
        fresh = [e for e in healthy if e not in failed_on]
        if fresh or healthy:
            return min(fresh or healthy, key=lambda e: e.in_flight)
        return min(self.endpoints, key=lambda e: e.free_at())

    async def _post(self, ep: _Endpoint, path: str, body: dict) -> dict:
        async with ep.slots, ep.throttle:
            ep.in_flight += 1
            try:
                r = await self.client.post(ep.url + path, json=body)
            except httpx.TimeoutException as e:
                raise _Retry(f"timed out ({type(e).__name__})") from None
            except httpx.TransportError as e:  # refused, reset, closed mid-answer: the endpoint is down
                ep.down_until = time.monotonic() + self.config.down_for
                raise _Retry(f"{type(e).__name__}: {e}") from None
            except httpx.HTTPError as e:  # an answer httpx cannot read (its encoding, redirects): try elsewhere
                raise _Retry(f"{type(e).__name__}: {e}") from None
            finally:
                ep.in_flight -= 1
        if r.status_code in RETRYABLE:
            after = retry_after(r.headers.get("retry-after"))
            ep.retry_at = time.monotonic() + after  # others take the requests meanwhile
            raise _Retry(f"HTTP {r.status_code}: {r.text[:200]}", after)
        if r.status_code >= 400:
            raise BackendError(f"HTTP {r.status_code} from {ep.url}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError:
            raise _Retry(f"not JSON: {r.text[:200]}") from None

    async def close(self) -> None:
        if self._loop is asyncio.get_running_loop():
            await self.client.aclose()
        self._loop = None


def retry_after(value: str | None) -> float:
    """A Retry-After header's seconds (at most a minute), or 0: absent, or a date, which we do not trust clocks for."""
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), 60.0) if math.isfinite(seconds) else 0.0


def is_private(url: str) -> bool:
    """Whether a key sent to `url` stays private: https, or plain http to this machine."""
    u = httpx.URL(url)
    try:
        return u.scheme == "https" or ipaddress.ip_address(u.host).is_loopback
    except ValueError:  # a name: only localhost is this machine (127.attacker.example is not)
        return u.host == "localhost"


def _completion(answer: dict, params: SamplingParams) -> Completion:
    """The server's answer as a Completion; an answer of another shape (no choices, wrong types, fewer choices than
    asked for, no content, no log-probs though asked for, an aborted or filtered answer) is the server
    misbehaving: retried elsewhere, then this request's failure, with the cause. Servers without vLLM's
    `token_ids` are counted by their log-probs, else by `usage` (the total exact, split evenly over the samples)."""
    try:
        outputs, uncounted = [], []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            lp = choice.get("logprobs") or {}
            if "message" in choice:
                text = choice["message"]["content"]
                cut = text is None and choice.get("finish_reason") == "length"  # cut off before any answer text
                text = "" if cut else text
                listed = lp.get("content")
                logprobs = [t["logprob"] for t in listed] if listed else None
            else:
                text, cut = choice["text"], False
                listed = lp.get("token_logprobs")
                logprobs = list(listed) if listed else None
            if params.logprobs and listed is None and not cut:
                raise ValueError("no log-probs, though asked for")
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
            if choice.get("finish_reason") in ABNORMAL:
                raise ValueError(f"the answer ended with finish_reason {choice['finish_reason']!r}")
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            ids = choice.get("token_ids")
            count = len(listed) if ids is None and listed is not None else None
            if ids is None and count is None:
                uncounted.append(len(outputs))
            outputs.append(
                Output(text=text, token_ids=ids or [], finish_reason=finish, logprobs=logprobs, token_count=count)
            )
        if len(outputs) not in (params.n, distinct_samples(params)):  # greedy: n choices, or the one we asked for
            raise ValueError(f"{len(outputs)} choices for n={params.n}")
        usage = answer.get("usage") or {}
        if uncounted:
            if "completion_tokens" not in usage:
                raise ValueError("no token counts: neither token_ids, log-probs nor usage")
            total = usage["completion_tokens"] - sum(o.generated_tokens for o in outputs)  # the uncounted add 0
            for rank, k in enumerate(uncounted):
                outputs[k].token_count = total // len(uncounted) + (rank < total % len(uncounted))
        return Completion(prompt_tokens=usage.get("prompt_tokens", 0), outputs=outputs * (params.n // len(outputs)))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise _Retry(f"unexpected answer ({type(e).__name__}: {e}): {str(answer)[:200]}") from None
