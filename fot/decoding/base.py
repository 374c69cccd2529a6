"""The one contract the search talks to: `await backend.generate(requests) -> list[Completion]`.

Every backend (native engine, vLLM in process, OpenAI-compatible servers, the scripted one for tests) takes the
same pydantic `Request`s, returns the same `Completion`s in request order, and keeps the same `Usage` counters.
Bad input raises `InvalidRequestError` before any work; a request that fails at run time fails alone: its
`Completion` carries the error and the others are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fot.config import SamplingParams
from fot.errors import ContextOverflowError, FotError, InvalidRequestError

ChatMessage = dict[str, str]


class BackendError(FotError, RuntimeError):
    """A request that could not be served (server down after every retry, engine failure); names the cause."""


class Request(BaseModel):
    """One prompt (text, or chat messages that get the model's chat template) and how to sample it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | list[ChatMessage]
    params: SamplingParams = SamplingParams()

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[ChatMessage]) -> str | list[ChatMessage]:
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty")
        for m in prompt if isinstance(prompt, list) else ():
            if set(m) != {"role", "content"}:
                raise ValueError(f"a chat message needs exactly 'role' and 'content', got {sorted(m)}")
        return prompt

    @classmethod
    def make(cls, item: Request | str | list[ChatMessage] | dict, **params: object) -> Request:
        """A `Request` from a prompt (plus sampling keywords) or a dict; bad values -> InvalidRequestError."""
        if isinstance(item, Request) and not params:
            return item
        try:
            if isinstance(item, dict):
                return cls(**item)
            if isinstance(item, Request):
                return cls(prompt=item.prompt, params=SamplingParams.make(item.params, **params))
            return cls(prompt=item, params=SamplingParams.make(None, **params))
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise InvalidRequestError(f"invalid request: {e}") from None


class Output(BaseModel):
    """One of a request's `n` samples."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None  # of each generated token, when the request asked for them
    token_count: int | None = None  # where a server reports how many tokens but not which

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids) if self.token_count is None else self.token_count

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


class Completion(BaseModel):
    """A request's result: its `n` outputs, or the error that made it fail alone. Reading `text` (and the other
    first-output shortcuts) of a failed completion raises that error."""

    prompt_tokens: int = 0
    outputs: list[Output] = Field(default_factory=list)
    error: str | None = None
    refused: bool = False  # failed because the backend refused the request itself: asked again, it would refuse
    forward_passes: int = 0  # per request where the backend can tell (the native engine); else 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first(self) -> Output:
        if self.error is not None:
            raise BackendError(self.error)
        return self.outputs[0]

    @property
    def text(self) -> str:
        return self.first.text

    @property
    def texts(self) -> list[str]:
        self.first  # noqa: B018 - raises on a failed request
        return [o.text for o in self.outputs]

    @property
    def token_ids(self) -> list[int]:
        return self.first.token_ids

    @property
    def finish_reason(self) -> str:
        return self.first.finish_reason

    @property
    def mean_logprob(self) -> float | None:
        return self.first.mean_logprob

    @property
    def generated_tokens(self) -> int:
        return sum(o.generated_tokens for o in self.outputs)


class Usage(BaseModel):
    """Counters every backend keeps over its lifetime. Speculative counters stay 0 where nothing was drafted;
    `forward_passes` counts model forwards (a batch forward once), where the backend can see them."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@runtime_checkable
class Backend(Protocol):
    """What the search needs of a decoding backend."""

    name: str
    usage: Usage

    async def generate(self, requests: Sequence[Request | str]) -> list[Completion]: ...

    async def close(self) -> None: ...


def distinct_samples(params: SamplingParams) -> int:
    """How many samples to ask a server for: n greedy samples are one, copied (vLLM refuses greedy n > 1)."""
    return 1 if params.temperature == 0 else params.n


def check_context(prompt_tokens: int, request: Request, context: int) -> None:
    """A prompt and its max_tokens must fit the model's context."""
    n = prompt_tokens + request.params.max_tokens
    if n > context:
        raise ContextOverflowError(f"prompt + max_tokens = {n} tokens exceed the context of {context}")


class BaseBackend:
    """Shared plumbing: request checking, usage accounting, async context manager. Subclasses implement
    `_generate(requests, prepared)` (`prepared`: what `prepare` returned for each request), which may assume valid
    requests and must return one Completion per request, in order."""

    name = "base"

    def __init__(self) -> None:
        self.usage = Usage()

    @staticmethod
    def parse_config(model: type[BaseModel], config: BaseModel | dict | None, options: dict) -> BaseModel:
        """A backend's config model from a model instance or dict plus keyword overrides; bad -> our error."""
        try:
            return model(**{**dict(config or {}), **options})
        except ValueError as e:
            raise InvalidRequestError(f"invalid {model.__name__}: {e}") from None

    def prepare(self, request: Request) -> object:
        """Backend-specific validation before any work (raise InvalidRequestError); returns what `_generate` needs
        of the request (its token ids, say), so that nothing is computed twice. None by default."""
        return None

    async def admit(self, request: Request) -> None:
        """Raise InvalidRequestError if `request` could not be served, without serving it: how a search checks
        its longest prompt before any work. `prepare`'s checks by default."""
        self.prepare(request)

    async def generate(self, requests: Sequence[Request | str]) -> list[Completion]:
        """Serve `requests` (Requests or plain prompts with default sampling) and return their completions in
        order. Raises InvalidRequestError before any work if any request is bad."""
        if isinstance(requests, str | Request) or not isinstance(requests, Sequence):
            raise InvalidRequestError("generate takes a list of requests")
        reqs = [Request.make(r) for r in requests]
        prepared = []
        for i, r in enumerate(reqs):
            try:
                prepared.append(self.prepare(r))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"request {i}: {e}") from None
        if not reqs:
            return []
        try:
            done = await self._generate(reqs, prepared)
        except Exception:  # the whole batch failed (a stopped worker, say): its requests count as failed
            self.usage.requests += len(reqs)
            self.usage.failed += len(reqs)
            raise
        for c in done:
            self.usage.requests += 1
            self.usage.failed += not c.ok
            self.usage.prompt_tokens += c.prompt_tokens  # once per request, whatever its n
            self.usage.generated_tokens += c.generated_tokens
        return done

    async def _generate(self, requests: list[Request], prepared: list) -> list[Completion]:
        raise NotImplementedError

    async def health(self) -> str | None:
        """Why the backend cannot serve now, or None where it can (`fot serve`'s /health answers 503 with it)."""
        return None

    async def close(self) -> None:
        """Release the backend's resources (threads, engines, connections)."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


@dataclass
class Drop:
    """Tells a backend's worker thread to take a cancelled caller's work out of its engine (`what`: whatever names
    that work there); the worker sets `done` once it has."""

    what: Any
    done: Future = field(default_factory=Future)


class WorkerBackend(BaseBackend):
    """A backend whose engine is built in one worker thread and stepped there, so that the event loop stays
    responsive. Built there, not in the caller's thread: GNU OpenMP gives every thread that runs parallel work its
    own team of threads, and once the teams outnumber the cores their threads stop spin-waiting, which slows every
    step. Callers hand work to the worker with `send` and wait for it with `wait`; it answers through `settle`.
    Subclasses implement `serve(engine)`, the worker's loop, which returns when it takes None (`close`) from the
    inbox."""

    poll_s = 1.0  # how often a waiting caller checks that the worker still runs

    def start_worker(self, build: Callable[[], Any], name: str) -> Any:
        """Build the engine in a new worker thread that then serves it; returns the engine, or raises what building
        it raised."""
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: BaseException | None = None
        ready: Future = Future()

        def run() -> None:
            try:
                engine = build()
            except Exception as e:
                ready.set_exception(e)
                return
            ready.set_result(engine)
            try:
                self.serve(engine)
            except BaseException as e:  # kept for the callers' errors; the thread still prints its traceback
                self.failure = e
                raise

        self.worker = threading.Thread(target=run, name=name, daemon=True)
        self.worker.start()
        return ready.result()

    def serve(self, engine: Any) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """Whether the worker still serves requests (False once closed, or once its loop failed)."""
        return self.worker.is_alive()

    async def health(self) -> str | None:
        return None if self.alive else str(self.stopped())

    def stopped(self) -> BackendError:
        if self.failure is None:
            return BackendError(f"the {self.name} backend is closed")
        return BackendError(f"the {self.name} backend stopped: {type(self.failure).__name__}: {self.failure}")

    def send(self, item: Any) -> None:
        """Hand the worker an item; refused at once once the worker has stopped."""
        if not self.alive:
            raise self.stopped()
        self.inbox.put(item)

    async def wait(self, futures: Sequence[asyncio.Future]) -> list:
        """The results of futures the worker settles, in order. Should the worker stop first, BackendError says
        why, where a plain await would wait forever."""
        while True:
            _, pending = await asyncio.wait(futures, timeout=self.poll_s)
            if not pending:
                return [f.result() for f in futures]
            if not self.alive:
                await asyncio.sleep(0)  # what the worker settled just before it stopped is still on its way
                if any(not f.done() for f in futures):
                    raise self.stopped()

    async def drop(self, what: Any, wait_s: float = 30.0) -> None:
        """Called by a cancelled caller: hand the worker a Drop and wait until it has acted, so that when the
        cancellation ends the engine no longer runs the caller's work and its slots are free."""
        item = Drop(what)
        self.inbox.put(item)
        if self.worker.is_alive():
            with contextlib.suppress(BaseException):  # a second cancel, or a worker that stopped: stop waiting
                await asyncio.wait_for(asyncio.wrap_future(item.done), wait_s)

    async def close(self) -> None:
        """Finish what is in flight, then stop the worker."""
        if self.worker.is_alive():
            self.inbox.put(None)
            await asyncio.to_thread(self.worker.join)


def settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any) -> None:
    """From the worker thread: give an awaiting caller its result (an exception is raised in the caller)."""

    def done() -> None:
        if future.done():  # the caller may have been cancelled meanwhile
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    loop.call_soon_threadsafe(done)


def run_sync(coro):
    """Run a coroutine from synchronous code (scripts); inside a running loop (notebooks) use `await` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()  # never to run: closed, so Python does not warn that it was never awaited
    raise FotError("an event loop is already running here (a notebook?): `await` the coroutine instead")
