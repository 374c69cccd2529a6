"""A deterministic backend with canned answers, for unit tests of the search logic only (never a demo).

It records every batch it receives (`batches`), so a test can pin that one search step reached the backend as one
batch. Token ids are the text's UTF-8 bytes: counts are real counts of something, and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fot.decoding.base import BaseBackend, Completion, Output, Request

Reply = str | Output | Exception
Responder = Callable[[Request, int], Reply]


class ScriptedBackend(BaseBackend):
    """`script` answers each sample: a callable `(request, sample_index) -> str | Output | Exception`, a mapping
    from prompt text (chat: the last message's content) to a reply or a list of replies (one per sample, cycled),
    or a sequence of replies handed out in call order. An Exception reply fails that request alone."""

    name = "scripted"

    def __init__(self, script: Responder | Mapping[str, Reply | Sequence[Reply]] | Sequence[Reply]):
        super().__init__()
        self.batches: list[list[Request]] = []
        if callable(script):
            self.respond = script
        elif isinstance(script, Mapping):
            self.respond = lambda r, j: _pick(script[_key(r)], j)
        else:
            replies = iter(script)
            self.respond = lambda r, j: next(replies)

    async def _generate(self, requests: list[Request], prepared: list) -> list[Completion]:
        self.batches.append(requests)
        done = []
        for r in requests:
            replies = [self.respond(r, j) for j in range(r.params.n)]
            failed = next((x for x in replies if isinstance(x, Exception)), None)
            if failed is not None:
                done.append(Completion(error=f"{type(failed).__name__}: {failed}"))
                continue
            outputs = [self._output(x, r) for x in replies]
            done.append(Completion(prompt_tokens=len(_key(r).encode()), outputs=outputs))
        return done

    @staticmethod
    def _output(reply: str | Output, request: Request) -> Output:
        """A reply as the engines give it: cut before its first stop string, then at `max_tokens` bytes."""
        if isinstance(reply, Output):
            return reply
        hits = [i for i in (reply.find(s) for s in request.params.stop) if i >= 0]
        reply = reply[: min(hits)] if hits else reply
        ids = list(reply.encode())[: request.params.max_tokens]
        text = bytes(ids).decode(errors="ignore")
        finish = "length" if len(ids) < len(reply.encode()) else "stop"
        logprobs = [0.0] * len(ids) if request.params.logprobs else None
        return Output(text=text, token_ids=ids, finish_reason=finish, logprobs=logprobs)


def _key(request: Request) -> str:
    return request.prompt if isinstance(request.prompt, str) else request.prompt[-1]["content"]


def _pick(reply: Reply | Sequence[Reply], j: int) -> Reply:
    if isinstance(reply, str | Output | Exception):
        return reply
    return reply[j % len(reply)]
