"""`fot serve`: Forest-of-Thought behind an OpenAI-compatible endpoint (FastAPI + uvicorn, `pip install 'fot[serve]'`).

    fot serve                                                   # native engine, embedded model, port 8000
    fot serve --backend openai --base-url http://gpu-a:8000/v1 --base-url http://gpu-b:8000/v1 --model m

`POST /v1/chat/completions` solves the last user message. `model` names the method and its size (`fot`, `fot-8`,
`sc-8`, `mctsr`, `tot`, `cot`); an `fot` object in the body sets any `ForestConfig` field and `task`. The reply is
an OpenAI chat completion whose message is the answer and whose `usage` sums every internal call; the forest
(votes, decision, trees, drafts, seconds) rides in an extra `fot` field, and `GET /v1/solutions/{id}/view` draws it.
With `stream: true` progress arrives as chunks after each search step, then the answer.

Every search of every client goes to the one backend, so concurrent searches share its batches. At most
`max_running` searches run and `max_queue` wait; past that a request gets 429 with Retry-After. A request ends by
its deadline (504), and a client that disconnects has its search cancelled and its engine slots freed. Errors are
OpenAI's error JSON with the right status, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fot.decoding.base import Backend, BackendError
from fot.errors import FotError, InvalidRequestError, SearchError
from fot.forest import MAX_TREES, ForestConfig, Method, Progress, Solution, asolve, make_config, validate

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - the extra is missing
    raise FotError(f"`fot serve` needs the serve extra (`pip install 'fot[serve]'`): {e}") from None

log = logging.getLogger("fot.server")

METHODS: dict[str, Method] = {"fot": "fot", "sc": "sc", "mctsr": "mctsr", "tot": "tot", "cot": "cot"}
SIZED = {"fot", "sc"}  # methods whose model name may carry a size: trees for fot, samples for sc
LISTED = ["fot", "fot-2", "fot-4", "fot-8", "sc-4", "sc-8", "mctsr", "tot", "cot"]
OPENAI_IGNORED = {"user", "metadata", "store"}  # accepted for client compatibility; they change nothing here


class ServeConfig(BaseModel):
    """Limits of the server. `search` holds default `ForestConfig` fields (a request's `fot` object wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[str] = Field(default_factory=list)  # empty: no key needed
    max_running: int = Field(16, ge=1)  # searches at once: they share the backend's batches
    max_queue: int = Field(64, ge=0)  # searches waiting for a place; beyond that, 429
    deadline: float = Field(600.0, gt=0)  # seconds per request, waiting included
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(64, ge=1)
    store: int = Field(256, ge=1)  # recent solutions kept for /v1/solutions/{id}
    search: dict[str, Any] = Field(default_factory=dict)


# ---- the request body ---------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name`, `tool_calls` and the like: carried, unused

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields fot serves. `max_tokens` bounds each answer the search writes."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    fot: dict[str, Any] | None = None  # ForestConfig fields, plus "task": auto | math | game24


class ApiError(Exception):
    """An error reply in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
        504: "timeout",
    }

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def parse_model(name: str) -> tuple[Method, int | None]:
    """`fot-8` -> ("fot", 8); a name that is no method -> 400."""
    m = re.fullmatch(r"([a-z]+)(?:-(\d{1,3}))?", name)
    if not m or m.group(1) not in METHODS or (m.group(2) and m.group(1) not in SIZED):
        raise ApiError(
            400,
            f"unknown model {name!r}: use one of {', '.join(LISTED)} (fot-N and sc-N take 1..{MAX_TREES})",
            code="model_not_found",
            param="model",
        )
    size = int(m.group(2)) if m.group(2) else None
    if size is not None and not 1 <= size <= MAX_TREES:
        raise ApiError(400, f"model {name!r}: the size must be 1..{MAX_TREES}", code="model_not_found", param="model")
    return METHODS[m.group(1)], size


class Job(BaseModel):
    """A validated request, ready to search: everything checked before any model work."""

    id: str
    model: str
    problem: str
    task: str
    config: ForestConfig
    stream: bool
    include_usage: bool


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, nested dicts merged key by key (a request's `mctsr.rollouts` keeps the server's other
    MCTSr defaults)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_job(body: ChatRequest, defaults: dict[str, Any]) -> Job:
    method, size = parse_model(body.model)
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's: fot solves it", param="messages")
    options = dict(body.fot or {})
    task = options.pop("task", "auto")
    if task not in ("auto", "math", "game24"):
        raise ApiError(400, f"fot.task must be auto, math or game24, got {task!r}", param="fot.task")
    for key, want in (("method", method), ("trees", size)):
        if key in options and want is not None and options[key] != want:
            raise ApiError(400, f"fot.{key}={options[key]!r} contradicts model {body.model!r}", param=f"fot.{key}")
    overrides: dict[str, Any] = {"method": method, "trees": size, "seed": body.seed}
    max_tokens = body.max_completion_tokens or body.max_tokens
    base = merged(defaults, options)
    if max_tokens is not None:
        base = merged(base, {"mctsr": {"max_tokens": max_tokens}})
    try:
        config = make_config(base, **overrides)
        the_task, problem = validate(body.messages[-1].text(), task, config.method)
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None
    include = bool(body.stream_options and body.stream_options.include_usage)
    return Job(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        model=body.model,
        problem=problem,
        task=the_task.name,
        config=config,
        stream=body.stream,
        include_usage=include,
    )


# ---- admission, metrics, store ------------------------------------------------------------------------------------
class Admission:
    """At most `running` searches at once and `queue` waiting; `ticket()` refuses at once (429) beyond that."""

    def __init__(self, running: int, queue: int):
        self.running, self.queue = running, queue
        self.active = self.waiting = 0
        self.slots = asyncio.Semaphore(running)
        self.latencies: deque[float] = deque(maxlen=64)

    def ticket(self) -> Ticket:
        if self.active + self.waiting >= self.running + self.queue:
            recent = statistics.median(self.latencies) if self.latencies else 1.0
            retry = max(1, math.ceil(recent * (self.waiting + 1) / self.running))
            raise ApiError(
                429,
                f"the server is busy: {self.active} searches run and {self.waiting} wait; retry in {retry} s",
                code="server_busy",
                headers={"Retry-After": str(retry)},
            )
        self.waiting += 1
        return Ticket(self)


class Ticket:
    """A place in the queue, then a running slot; `release` gives either back, once."""

    def __init__(self, admission: Admission):
        self.admission, self.state = admission, "waiting"

    async def enter(self) -> None:
        await self.admission.slots.acquire()
        self.admission.waiting -= 1
        self.admission.active += 1
        self.state = "running"

    def release(self) -> None:
        if self.state == "waiting":
            self.admission.waiting -= 1
        elif self.state == "running":
            self.admission.active -= 1
            self.admission.slots.release()
        self.state = "done"


class Metrics:
    """Prometheus counters of this server (its own registry), and the backend's draft counters read at scrape."""

    def __init__(self, backend: Backend, admission: Admission):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fot_requests", "chat completion requests by status", ["status"], registry=r)
        self.prompt = Counter("fot_prompt_tokens", "prompt tokens of every internal call", registry=r)
        self.completion = Counter("fot_completion_tokens", "tokens generated by every internal call", registry=r)
        self.cancelled = Counter("fot_cancelled_searches", "searches cancelled by a client disconnect", registry=r)
        buckets = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
        self.latency = Histogram("fot_request_seconds", "time to answer a request", buckets=buckets, registry=r)
        Gauge("fot_queue_depth", "searches waiting for a place", registry=r).set_function(lambda: admission.waiting)
        Gauge("fot_running_searches", "searches running", registry=r).set_function(lambda: admission.active)
        r.register(_BackendCollector(backend))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BackendCollector:
    def __init__(self, backend: Backend):
        self.backend = backend

    def collect(self):
        u = self.backend.usage
        for name, doc, value in (
            ("fot_backend_requests", "requests the backend served", u.requests),
            ("fot_backend_forward_passes", "model forwards of the backend", u.forward_passes),
            ("fot_draft_tokens", "draft tokens proposed by speculative decoding", u.draft_tokens),
            ("fot_accepted_tokens", "draft tokens accepted", u.accepted_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class Store:
    """The most recent solutions by id, for the viewer."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict[str, Solution]()

    def put(self, key: str, solution: Solution) -> None:
        self.items[key] = solution
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, key: str) -> Solution:
        if key not in self.items:
            raise ApiError(404, f"no solution {key!r} (the server keeps the last {self.size})", code="not_found")
        return self.items[key]


# ---- replies ------------------------------------------------------------------------------------------------------
def usage_of(s: Solution) -> dict[str, int]:
    u = s.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
    }


def summary(job: Job, s: Solution) -> dict[str, Any]:
    u = s.usage
    return {
        "solution_id": job.id,
        "task": s.task,
        "method": s.method,
        "answer": s.answer,
        "votes": s.votes,
        "decision": s.decision,
        "confidence": s.confidence,
        "tree_answers": s.tree_answers,
        "trees": len(s.trees),
        "requests": u.requests,
        "corrections": u.corrections,
        "code_repairs": u.code_repairs,
        "arithmetic_repairs": u.arithmetic_repairs,
        "repairs": [r.model_dump() for r in s.repairs],
        "tokens_saved": u.tokens_saved,
        "draft_tokens": u.draft_tokens,
        "accepted_tokens": u.accepted_tokens,
        "seconds": round(u.seconds, 3),
        "view": f"/v1/solutions/{job.id}/view",
    }


def content_of(s: Solution) -> str:
    return s.answer if s.answer is not None else "No answer: none of the trees reached one."


def completion(job: Job, s: Solution, created: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": content_of(s)}
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": created,
        "model": job.model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": usage_of(s),
        "fot": summary(job, s),
    }


def sse(body: dict | str) -> str:
    """One server-sent event."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def chunk(job: Job, created: int, delta: dict | None, finish: str | None = None, **extra: Any) -> str:
    """A chat.completion.chunk event; `delta` None: no choices (the usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": job.model}
    return sse(body | {"choices": choices} | extra)


def progress_chunk(job: Job, created: int, p: Progress) -> str:
    return chunk(job, created, {}, fot={"event": "progress", **p.model_dump()})


def search_error(e: BaseException, deadline: float, logged: bool = False) -> ApiError:
    """The reply for a search that raised: the client's fault (400), the backend's (503), the clock's (504)."""
    if isinstance(e, TimeoutError):
        return ApiError(504, f"the search ran past the server's deadline of {deadline:g} s", code="deadline_exceeded")
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e))
    if isinstance(e, SearchError | BackendError):
        return ApiError(503, f"the backend failed, so the search has no answer: {e}", code="backend_unavailable")
    if isinstance(e, FotError):
        log.warning("search failed: %s", e)
        return ApiError(500, f"the search failed: {e}", code="search_failed")
    if not logged:  # the cause is logged once, with its traceback
        log.error("search failed", exc_info=e)
    return ApiError(500, "internal error: the server logged its cause", code="internal_error")


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(backend: Backend, config: ServeConfig | None = None) -> FastAPI:
    """The server over `backend` (built by the caller, closed when the app shuts down)."""
    cfg = config or ServeConfig()
    admission = Admission(cfg.max_running, cfg.max_queue)
    metrics, store, started = Metrics(backend, admission), Store(cfg.store), int(time.time())
    keys = [k.encode() for k in cfg.api_keys]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(title="fot", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.admission, app.state.store = backend, admission, store

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in keys):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def read_json(request: Request) -> ChatRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes")
        raw, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > cfg.max_body_bytes:
                raise ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes")
            raw.append(part)
        try:
            data = json.loads(b"".join(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = set(data) - set(ChatRequest.model_fields)
        if unknown:
            raise ApiError(
                400,
                f"unsupported field(s) {sorted(unknown)}: the search sets its own sampling; put search "
                "options in the 'fot' object (ForestConfig fields)",
                param=sorted(unknown)[0],
            )
        if isinstance(data.get("messages"), list) and len(data["messages"]) > cfg.max_messages:
            raise ApiError(400, f"{len(data['messages'])} messages: at most {cfg.max_messages}", param="messages")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None

    async def search(job: Job, ticket: Ticket, progress) -> Solution:
        """Wait for a place, then solve; the deadline counts from arrival."""
        async with asyncio.timeout(cfg.deadline):
            await ticket.enter()
            return await asolve(job.problem, task=job.task, backend=backend, config=job.config, progress=progress)

    def finished(job: Job, t0: float, result: Solution | ApiError) -> None:
        if isinstance(result, ApiError):
            metrics.requests.labels(str(result.status)).inc()
            return
        store.put(job.id, result)
        seconds = time.perf_counter() - t0
        admission.latencies.append(seconds)
        metrics.latency.observe(seconds)
        metrics.requests.labels("200").inc()
        metrics.prompt.inc(result.usage.prompt_tokens)
        metrics.completion.inc(result.usage.generated_tokens)

    async def abandon(solving: asyncio.Future) -> None:
        """Cancel a search whose client went away, and wait until its requests have left the backend. The wait is
        shielded: a streaming response whose client hung up runs in a cancelled anyio scope, which would cut every
        await short and free the search's slot while its batches still ran."""
        solving.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
            await solving
        metrics.cancelled.inc()

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            authorize(request)
            job = make_job(await read_json(request), cfg.search)
            ticket = admission.ticket()
        except ApiError as e:
            metrics.requests.labels(str(e.status)).inc()
            return e.response()
        if job.stream:
            return StreamingResponse(
                stream(request, job, ticket, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        solving = asyncio.ensure_future(search(job, ticket, None))
        watching = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({solving, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not solving.done():  # the client went away: its search goes, and its engine slots with it
                await abandon(solving)
                return Response(status_code=499)
            try:
                solution = solving.result()
            except Exception as e:
                err = search_error(e, cfg.deadline)
                finished(job, t0, err)
                return err.response()
            finished(job, t0, solution)
            return JSONResponse(completion(job, solution, int(time.time())))
        finally:
            watching.cancel()
            solving.cancel()  # a no-op once it is done; else the handler itself was cancelled (shutdown)
            ticket.release()

    async def stream(request: Request, job: Job, ticket: Ticket, t0: float) -> AsyncIterator[str]:
        created, events = int(time.time()), asyncio.Queue()
        solving = asyncio.ensure_future(search(job, ticket, events.put_nowait))
        watching = asyncio.ensure_future(until_disconnect(request))
        try:
            yield chunk(job, created, {"role": "assistant", "content": ""})
            while not solving.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, solving, watching}, return_when=asyncio.FIRST_COMPLETED)
                if watching.done():
                    getter.cancel()
                    return
                if getter.done():
                    yield progress_chunk(job, created, getter.result())
                else:
                    getter.cancel()
            while not events.empty():
                yield progress_chunk(job, created, events.get_nowait())
            try:
                solution = solving.result()
            except Exception as e:
                err = search_error(e, cfg.deadline)
                finished(job, t0, err)
                yield sse(err.body())
                yield sse("[DONE]")
                return
            finished(job, t0, solution)
            yield chunk(job, created, {"content": content_of(solution)})
            yield chunk(job, created, {}, "stop", fot={"event": "done", **summary(job, solution)})
            if job.include_usage:
                yield chunk(job, created, None, usage=usage_of(solution))
            yield sse("[DONE]")
        finally:
            watching.cancel()
            if not solving.done():  # disconnected (or the response was torn down): cancel the search
                await abandon(solving)
            ticket.release()

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = [{"id": m, "object": "model", "created": started, "owned_by": "fot"} for m in LISTED]
        return {"object": "list", "data": data}

    @app.get("/v1/solutions/{key}")
    async def solution_json(key: str, request: Request):
        authorize(request)
        return JSONResponse(json.loads(store.get(key).model_dump_json()))

    @app.get("/v1/solutions/{key}/view")
    async def solution_view(key: str, request: Request):
        authorize(request)
        return HTMLResponse(store.get(key).to_html())

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name, "running": admission.active, "waiting": admission.waiting}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return search_error(e, cfg.deadline, logged=True).response()  # Starlette re-raises it: uvicorn logs it

    return app


def serve(backend: Backend, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(backend, config), host=host, port=port, log_level="info", access_log=False)
