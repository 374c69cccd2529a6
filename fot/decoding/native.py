"""The project's own engine behind the Backend contract, with continuous batching.

Many asyncio tasks (all the trees of a forest, many problems) call `generate` at about the same time. A worker
thread owns the engine and steps it (so the event loop stays responsive): requests that arrive while others run
join the batch at the next step, and each caller gets its completions as soon as its own samples finish, so a tree
whose answer was short goes on to its next question while the others still write. On an idle engine the first
request waits a short collection window for company, so that concurrent callers start in one prefill forward.
"""

from __future__ import annotations

import asyncio
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from fot.config import SamplingParams, SpeculativeConfig
from fot.decoding.base import BackendError, Completion, Drop, Output, Request, WorkerBackend, settle
from fot.errors import InvalidRequestError
from fot.speculative.engine import Engine


class NativeConfig(BaseModel):
    """Options of the native backend. `speculative`: None (plain decoding), "prompt_lookup", or a
    `SpeculativeConfig`/dict. `window` is how long (seconds) the first request to an idle engine waits for
    company."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "default"
    dtype: str = "auto"  # bf16 where our CPU kernels run (greedy drafts exact) and on a GPU, else fp32
    device: str = "cpu"  # any torch device: "cuda" runs the same engine on a GPU
    speculative: SpeculativeConfig | str | None = "prompt_lookup"
    max_batch: int = Field(32, ge=1)
    window: float = Field(0.005, ge=0.0)
    seed: int = 0


class NativeBackend(WorkerBackend):
    """The native engine behind the Backend contract. Pass `engine=` to serve an engine you built, for example one
    sharing its model with another; on a CPU with few cores prefer letting the backend build it (from `config`),
    since an engine whose weights were loaded in another thread than the one stepping it runs much slower."""

    name = "native"

    def __init__(self, config: NativeConfig | dict | None = None, *, engine: Engine | None = None, **options):
        super().__init__()
        self.config = c = self.parse_config(NativeConfig, config, options)
        given = set(options) | (config.model_fields_set if isinstance(config, BaseModel) else set(config or {}))
        built = {"model", "dtype", "device", "speculative", "max_batch", "seed"} & given
        if engine is not None and built:  # they build an engine; one given is served as it is
            raise InvalidRequestError(f"{sorted(built)} cannot apply to an engine= given; set them on the engine")
        SpeculativeConfig.make(c.speculative)  # a bad one fails here, not in the worker after the model loads

        def build() -> Engine:
            return engine or Engine.from_pretrained(
                c.model, dtype=c.dtype, device=c.device, max_batch=c.max_batch, seed=c.seed, speculative=c.speculative
            )

        self.engine: Engine = self.start_worker(build, "fot-native")  # all of its torch work, loading included

    async def set_speculative(self, speculative: SpeculativeConfig | dict | str | None) -> None:
        """Switch the engine's drafter (None: plain decoding) between runs, in the worker thread that steps it;
        refused while requests are in flight (`Engine.set_speculative`)."""
        item = _Switch(speculative)
        self.send(item)
        await self.wait([asyncio.wrap_future(item.done)])

    def prepare(self, request: Request) -> list[int]:
        return self.engine.encode_request(request.prompt, request.params)

    async def _generate(self, requests: list[Request], prompt_ids: list[list[int]]) -> list[Completion]:
        # n samples of a request become n engine sequences; a seeded request's j-th sample uses seed + j
        prompts, params, owner = [], [], []
        for i, (r, ids) in enumerate(zip(requests, prompt_ids, strict=True)):
            for j in range(r.params.n):
                seed = None if r.params.seed is None else r.params.seed + j
                prompts.append(ids)
                params.append(SamplingParams.make(r.params, n=1, seed=seed))
                owner.append(i)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.send((prompts, params, future, loop))
        try:
            [gens] = await self.wait([future])
        except asyncio.CancelledError:  # the caller went away: its samples leave the engine, their slots free
            await self.drop(future)
            raise
        except BackendError:  # the worker stopped: this backend serves nothing more
            raise
        except Exception as e:  # the engine failed: every request in flight fails alone, with the cause
            return [Completion(error=f"native engine failed: {type(e).__name__}: {e}") for _ in requests]
        done = [Completion(prompt_tokens=len(ids)) for ids in prompt_ids]
        for i, g in zip(owner, gens, strict=True):
            c = done[i]
            c.outputs.append(
                Output(text=g.text, token_ids=g.token_ids, finish_reason=g.finish_reason, logprobs=g.logprobs)
            )
            c.forward_passes = max(c.forward_passes, g.forward_passes)
            c.draft_tokens += g.draft_tokens
            c.accepted_tokens += g.accepted_tokens
        return done

    def serve(self, engine: Engine) -> None:
        """The worker's loop: take new requests into the engine, step it, and hand each caller its generations
        once all of its samples are done; block while there is nothing to run."""
        owners: dict[int, _Call] = {}  # id(sample) -> the call it belongs to
        closing = False
        while not (closing and engine.idle):
            items = []
            if not closing:
                try:
                    items.append(self.inbox.get(block=engine.idle))
                    if engine.idle:
                        time.sleep(self.config.window)  # company for the first request
                except queue.Empty:
                    pass
            while not self.inbox.empty():  # closing too: a caller cancelled meanwhile waits for its Drop
                items.append(self.inbox.get())
            for item in items:
                if item is None:
                    closing = True
                    continue
                if isinstance(item, _Switch):
                    try:
                        engine.set_speculative(item.speculative)
                        item.done.set_result(None)
                    except Exception as e:  # busy, or a bad config: the caller hears it
                        item.done.set_exception(e)
                    continue
                if isinstance(item, Drop):
                    calls = {id(call): call for call in owners.values() if call.future is item.what}
                    for call in calls.values():
                        engine.cancel(call.seqs)
                        for seq in call.seqs:
                            owners.pop(id(seq), None)
                    item.done.set_result(None)
                    continue
                prompts, params, future, loop = item
                try:
                    call = _Call(engine.submit(prompts, params), future, loop)
                except Exception as e:  # refused (the backend checked the requests: should not happen)
                    settle(loop, future, e)
                    continue
                owners.update((id(seq), call) for seq in call.seqs)
            if engine.idle:
                continue
            before = engine.stats.snapshot()
            try:
                finished = engine.step()
            except Exception as e:  # the engine dropped everything in flight: each caller hears why
                for call in {id(call): call for call in owners.values()}.values():
                    settle(call.loop, call.future, e)
                owners.clear()
                continue
            d, u = engine.stats.since(before), self.usage  # only the counters this thread owns: the caller's
            u.forward_passes += d.forward_passes  # thread adds requests and tokens at the same time
            u.draft_tokens += d.draft_tokens
            u.accepted_tokens += d.accepted_tokens
            for seq in finished:
                call = owners.pop(id(seq))
                call.left -= 1
                if call.left == 0:
                    settle(call.loop, call.future, [engine.result(q) for q in call.seqs])


@dataclass
class _Switch:
    """Tells the worker to change the engine's drafter; `done` says when it has, or why not."""

    speculative: SpeculativeConfig | dict | str | None
    done: Future = field(default_factory=Future)


@dataclass
class _Call:
    """The samples of one `generate` call, and where its result goes."""

    seqs: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    left: int = field(init=False)

    def __post_init__(self) -> None:
        self.left = len(self.seqs)
