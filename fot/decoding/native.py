"""The project's own engine behind the Backend contract: concurrent callers are gathered into one engine batch.

Many asyncio tasks (all the trees of a forest, many problems) call `generate` at about the same time. Their
requests wait a short collection window, then go to the engine together as ONE batch (EMS-SD verifies all of its
samples' drafts in one forward), which runs in a worker thread so the event loop stays responsive. Requests that
arrive while a batch runs form the next one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from fot.config import SamplingParams, SpeculativeConfig
from fot.decoding.base import BaseBackend, Completion, Output, Request, Usage
from fot.speculative.engine import Engine


class NativeConfig(BaseModel):
    """Options of the native backend. `speculative`: None (plain decoding), "prompt_lookup", or a
    `SpeculativeConfig`/dict. `window` is how long (seconds) the first request of a batch waits for company."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "default"
    dtype: str = "auto"  # fp32 on CPU (exact), bf16 on a GPU; "fast": bf16 also on CPUs with AVX512-BF16/AMX
    device: str = "cpu"  # any torch device: "cuda" runs the same engine on a GPU
    speculative: SpeculativeConfig | str | None = "prompt_lookup"
    max_batch: int = Field(32, ge=1)
    window: float = Field(0.005, ge=0.0)
    seed: int = 0


class NativeBackend(BaseBackend):
    name = "native"

    def __init__(self, config: NativeConfig | dict | None = None, *, engine: Engine | None = None, **options):
        super().__init__()
        self.config = self.parse_config(NativeConfig, config, options)
        c = self.config
        # All of the engine's torch work, loading included, runs in this one thread: GNU OpenMP gives every thread
        # that runs parallel work its own team of threads, and once the teams outnumber the cores their threads
        # stop spin-waiting; a model loaded in the caller's thread made every decoding step ~2x slower (measured).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fot-native")
        self.engine = (
            engine
            or self._pool.submit(
                Engine.from_pretrained,
                c.model,
                dtype=c.dtype,
                device=c.device,
                max_batch=c.max_batch,
                seed=c.seed,
                speculative=c.speculative,
            ).result()
        )
        self._pending: list[tuple[list[list[int]], list[SamplingParams], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

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
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompts, params, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        try:
            gens = await future
        except Exception as e:  # the engine failed on this batch: every request in it fails alone, with the cause
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

    async def _drain(self) -> None:
        """Collect what arrives within the window, run it as one engine batch in the worker thread, repeat."""
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(self.config.window)
            batch, self._pending = self._pending, []
            prompts = [p for b in batch for p in b[0]]
            params = [p for b in batch for p in b[1]]
            try:
                gens = await loop.run_in_executor(self._pool, self.engine.generate, prompts, params)
            except Exception as e:
                for *_, fut in batch:
                    if not fut.done():  # a caller may have been cancelled meanwhile
                        fut.set_exception(e)
                continue
            s = self.engine.last_stats
            self.usage.add(
                Usage(forward_passes=s.forward_passes, draft_tokens=s.draft_tokens, accepted_tokens=s.accepted_tokens)
            )
            start = 0
            for sub_prompts, _, fut in batch:
                if not fut.done():
                    fut.set_result(gens[start : start + len(sub_prompts)])
                start += len(sub_prompts)

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker
        self._pool.shutdown(wait=True)
