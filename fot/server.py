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
import socket
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fot.chat import (
    LISTED,
    ApiError,
    ChatRequest,
    Job,
    chunk,
    completion,
    content_of,
    make_job,
    progress_chunk,
    sse,
    summary,
    usage_of,
)
from fot.decoding.base import Backend, BackendError
from fot.errors import FotError, InvalidRequestError, SearchError
from fot.forest import Solution, asolve
from fot.tasks.math import start_verifier

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - the extra is missing
    raise FotError(f"`fot serve` needs the serve extra (`pip install 'fot[serve]'`): {e}") from None

log = logging.getLogger("fot.server")
SHUTDOWN_GRACE_S = 10.0  # seconds the searches in flight get to finish after Ctrl-C
STREAM_NOTICE_S = 1.0  # a stream still searching then ends this long before the cut, with an error its client reads


class ServeConfig(BaseModel):
    """Limits of the server. `search` holds default `ForestConfig` fields (a request's `fot` object wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    api_keys: list[str] = Field(default_factory=list)  # empty: no key needed
    max_running: int = Field(16, ge=1)  # searches at once: they share the backend's batches
    max_queue: int = Field(64, ge=0)  # searches waiting for a place; beyond that, 429
    deadline: float = Field(600.0, gt=0)  # seconds per request, waiting included
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(64, ge=1)
    store: int = Field(256, ge=1)  # recent solutions kept for /v1/solutions/{id}
    search: dict[str, Any] = Field(default_factory=dict)

    @field_validator("api_keys")
    @classmethod
    def _no_blank_key(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):  # `--api-key "$KEY"` with KEY unset: an empty key lets anyone in
            raise ValueError("an API key is empty (an unset variable?)")
        return keys


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
        self.owned = False  # a stream's body has taken charge of it (and gives it back in its `finally`)

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
        self.prompt = Counter("fot_prompt_tokens", "prompt tokens of the answered searches' calls", registry=r)
        self.completion = Counter("fot_completion_tokens", "tokens generated by the answered searches", registry=r)
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
            ("fot_backend_requests", "requests the backend served, failed ones too", u.requests),
            ("fot_backend_failed_requests", "requests that failed (after the backend's own retries)", u.failed),
            ("fot_backend_prompt_tokens", "prompt tokens of answered requests", u.prompt_tokens),
            ("fot_backend_generated_tokens", "tokens generated for answered requests", u.generated_tokens),
            ("fot_backend_forward_passes", "model forwards of the backend", u.forward_passes),
            ("fot_draft_tokens", "draft tokens proposed by speculative decoding", u.draft_tokens),
            ("fot_accepted_tokens", "draft tokens accepted", u.accepted_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        if hasattr(self.backend, "retries"):  # the openai backend's attempts that failed and were tried again
            doc = "upstream attempts that failed and were retried"
            yield CounterMetricFamily("fot_backend_retries", doc, value=self.backend.retries)


class Store:
    """The most recent solutions by id, for the viewer: at most `size` of them, holding about `max_chars` of text
    together (a 64-tree search of long answers holds megabytes; the newest is kept whatever its size)."""

    def __init__(self, size: int, max_chars: int = 64 << 20):
        self.size, self.max_chars, self.chars = size, max_chars, 0
        self.items = OrderedDict[str, tuple[Solution, int]]()

    def put(self, key: str, solution: Solution) -> None:
        texts = (v for t in solution.trees for n in t["nodes"] for v in n.values() if isinstance(v, str))
        chars = len(solution.problem) + sum(map(len, texts))  # answers, critiques, what a repair replaced
        self.items[key] = (solution, chars)
        self.chars += chars
        while len(self.items) > self.size or self.chars > self.max_chars and len(self.items) > 1:
            self.chars -= self.items.popitem(last=False)[1][1]

    def get(self, key: str) -> Solution:
        if key not in self.items:
            raise ApiError(404, f"no solution {key!r} (the server keeps the last {self.size})", code="not_found")
        return self.items[key][0]


class TicketedStream(StreamingResponse):
    """A server-sent-event stream that gives its queue ticket back however it ends: its body's `finally` does, but
    a client gone before the first chunk (the response start failing to send) ends it before its body ever ran."""

    def __init__(self, body: AsyncIterator[str], ticket: Ticket):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.ticket.owned:
                self.ticket.release()


def search_error(e: BaseException, deadline: float, logged: bool = False) -> ApiError:
    """The reply for a search that raised: the client's fault (400), the backend's (502 refused, 503 failed), the
    clock's (504)."""
    final = {"x-should-retry": "false"}  # the openai client retries a 5xx: a search run again fails again
    if isinstance(e, TimeoutError):
        return ApiError(
            504, f"the search ran past the server's deadline of {deadline:g} s", code="deadline_exceeded", headers=final
        )
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e))
    if isinstance(e, SearchError) and not e.retryable:  # `x-should-retry`: the openai client would retry a 5xx
        return ApiError(
            502,
            f"the backend refused the search's requests, so it has no answer (the same request would fail again): {e}",
            code="backend_refused",
            headers=final,
        )
    if isinstance(e, SearchError | BackendError):
        return ApiError(503, f"the backend failed, so the search has no answer: {e}", code="backend_unavailable")
    if isinstance(e, FotError):
        log.warning("search failed: %s", e)
        return ApiError(500, f"the search failed: {e}", code="search_failed", headers=final)
    if not logged:  # the cause is logged once, with its traceback
        log.error("search failed", exc_info=e)
    return ApiError(500, "internal error: the server logged its cause", code="internal_error", headers=final)


def reply(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(backend: Backend, config: ServeConfig | None = None) -> FastAPI:
    """The server over `backend` (built by the caller, closed when the app shuts down)."""
    cfg = config or ServeConfig()
    admission = Admission(cfg.max_running, cfg.max_queue)
    metrics, store, started = Metrics(backend, admission), Store(cfg.store), int(time.time())
    keys = [k.encode() for k in cfg.api_keys]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(start_verifier)  # the first math vote would block the event loop for seconds
        yield
        await backend.close()

    app = FastAPI(title="fot", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.admission, app.state.store = backend, admission, store
    app.state.stopping = asyncio.Event()  # set by `serve` when Ctrl-C starts the shutdown

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.encode("latin-1")  # the header's own bytes (decoded as latin-1): a UTF-8 key matches
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(sent, k) for k in keys):
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
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested 50,000 deep
            raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
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
        if job.store:
            store.put(job.id, result)
        seconds = time.perf_counter() - t0
        admission.latencies.append(seconds)
        metrics.latency.observe(seconds)
        metrics.requests.labels("200").inc()
        metrics.prompt.inc(result.usage.prompt_tokens)
        metrics.completion.inc(result.usage.generated_tokens)

    async def abandon(solving: asyncio.Future) -> None:
        """Cancel a search whose client went away (or whose server stops), and wait until its requests have left
        the backend. The wait is shielded: a streaming response whose client hung up runs in a cancelled anyio
        scope, which would cut every await short and free the search's slot while its batches still ran."""
        solving.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
            await solving

    async def shut_down(job: Job, t0: float, solving: asyncio.Future) -> ApiError:
        """The server stops before the search ends: the search goes, and its client gets this 503."""
        await abandon(solving)
        err = ApiError(503, "the server is shutting down; the search was cancelled", code="shutting_down")
        finished(job, t0, err)
        return err

    def hung_up() -> None:
        metrics.cancelled.inc()
        metrics.requests.labels("499").inc()

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
            return reply(e)
        except ClientDisconnect:  # it hung up while sending its body
            hung_up()
            return Response(status_code=499)
        if job.stream:
            return TicketedStream(stream(request, job, ticket, t0), ticket)
        solving = asyncio.ensure_future(search(job, ticket, None))
        watching = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({solving, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not solving.done():  # the client went away: its search goes, and its engine slots with it
                await abandon(solving)
                hung_up()
                return Response(status_code=499)
            try:
                solution = solving.result()
            except Exception as e:
                err = search_error(e, cfg.deadline)
                finished(job, t0, err)
                return reply(err)
            finished(job, t0, solution)
            return JSONResponse(completion(job, solution, int(time.time())))
        except asyncio.CancelledError:  # the server stops (Ctrl-C, past its grace): the search goes, the client is told
            return reply(await shut_down(job, t0, solving))
        finally:
            watching.cancel()
            solving.cancel()  # a no-op once it is done or abandoned
            ticket.release()

    async def notice() -> None:
        """Returns once the server stops (`serve`'s Ctrl-C) and its grace is nearly over."""
        await app.state.stopping.wait()
        await asyncio.sleep(SHUTDOWN_GRACE_S - STREAM_NOTICE_S)

    async def stream(request: Request, job: Job, ticket: Ticket, t0: float) -> AsyncIterator[str]:
        """Progress chunks, then the answer. A stream has sent its 200, so when the server stops before its search
        ends, it ends with a `shutting_down` error event, not a cut connection its client would read as a quiet
        end."""
        created, events = int(time.time()), asyncio.Queue()
        ticket.owned = True
        solving = asyncio.ensure_future(search(job, ticket, events.put_nowait))
        watching = asyncio.ensure_future(until_disconnect(request))
        closing = asyncio.ensure_future(notice())
        try:
            yield chunk(job, created, {"role": "assistant", "content": ""})
            while not solving.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, solving, watching, closing}, return_when=asyncio.FIRST_COMPLETED)
                if watching.done():
                    getter.cancel()
                    return
                if closing.done() and not solving.done():
                    getter.cancel()
                    yield sse((await shut_down(job, t0, solving)).body())
                    yield sse("[DONE]")
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
            closing.cancel()
            if not solving.done():  # disconnected (or the response was torn down): cancel the search
                await abandon(solving)
                hung_up()
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
    async def health(request: Request):
        """Open to probes without a key; the cause of a 503 (it names the upstreams) only with one."""
        state = {"backend": backend.name, "running": admission.active, "waiting": admission.waiting}
        check = getattr(backend, "health", None)  # a worker that stopped, an upstream that does not answer
        problem = await check() if check is not None else None
        if problem is not None:
            try:
                authorize(request)
                state["error"] = problem
            except ApiError:
                pass
            return JSONResponse({"status": "down", **state}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return reply(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return reply(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return reply(ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return reply(search_error(e, cfg.deadline, logged=True))  # Starlette re-raises it: uvicorn logs it

    return app


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before a model loads: a taken port is an error at once, not after minutes."""
    if not 0 <= port <= 65535:  # getaddrinfo would take 70000 as 4464
        raise FotError(f"cannot listen on port {port}: a port is 0-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FotError(f"cannot listen on {host}:{port}: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise FotError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(backend: Backend, config: ServeConfig, sock: socket.socket) -> None:
    """Run the server on `sock` (from `listen`) until interrupted. On Ctrl-C the searches in flight get
    `SHUTDOWN_GRACE_S` to finish; then they are cancelled, and the backend is closed."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(backend, config)
    options = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.stopping.set()  # the streams still searching end with an error before the grace runs out
            await super().shutdown(sockets)

    host, port = sock.getsockname()[:2]
    log.info("fot serve: listening on http://%s:%d", host, port)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the Ctrl-C again once it has stopped
        Server(options).run(sockets=[sock])
