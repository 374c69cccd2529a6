"""The OpenAI chat-completions format as `fot serve` speaks it: a request body checked into a search `Job` before
any model work, and a `Solution` written back as a chat completion or as stream chunks. No HTTP here
(fot.server)."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fot.errors import InvalidRequestError
from fot.forest import MAX_SEED, MAX_TREES, ForestConfig, Method, Progress, Solution, make_config, validate

METHODS: dict[str, Method] = {"fot": "fot", "sc": "sc", "mctsr": "mctsr", "tot": "tot", "cot": "cot"}
SIZED = {"fot", "sc"}  # methods whose model name may carry a size: trees for fot, samples for sc
LISTED = ["fot", "fot-2", "fot-4", "fot-8", "sc-4", "sc-8", "mctsr", "tot", "cot"]


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
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
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
    store: bool  # kept for /v1/solutions (the client may say `store: false`)


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
    try:
        config = make_config(base, **overrides)
        if max_tokens is not None:  # each answer's budget: an MCTSr answer, a ToT proposal, and a ToT value at most
            tot = {"propose_tokens": max_tokens, "value_tokens": min(max_tokens, config.tot.value_tokens)}
            config = make_config(merged(base, {"mctsr": {"max_tokens": max_tokens}, "tot": tot}), **overrides)
        the_task, problem = validate(body.messages[-1].text(), task, config)
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
        store=body.store is not False,
    )


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
        "view": f"/v1/solutions/{job.id}/view" if job.store else None,
    }


def content_of(s: Solution) -> str:
    """The answer, or a plain statement that the search (any method: one chain of thought or a forest) had none."""
    return s.answer if s.answer is not None else f"No answer: the {s.method} search reached none."


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
