"""vLLM in process behind the Backend contract.

vLLM's synchronous `LLMEngine` runs with its engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no
child process, so scripts need no `__main__` guard and tests leave nothing behind) and is stepped by one worker
thread. Requests from the event loop are handed to that thread and join the running batch at the next step
(vLLM's continuous batching); finished outputs go back to their awaiting callers. Prefix caching is on: the trees
of a forest share long prompt prefixes. vLLM's own speculative methods (ngram, a draft model) pass through
`speculative_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fot.decoding.base import (
    Completion,
    Drop,
    Output,
    Request,
    Usage,
    WorkerBackend,
    check_context,
    distinct_samples,
    settle,
)
from fot.decoding.kangaroo_vllm import ADAPTER_ENV, KANGAROO_VLLM
from fot.errors import InvalidRequestError, ModelError
from fot.models import cache_dir, resolve_model
from fot.speculative.kangaroo import adapter_folder


class VLLMConfig(BaseModel):
    """Options of the in-process vLLM backend. `kv_cache_gib` sizes vLLM's CPU KV cache (its default, ~11 GiB
    here, slows start-up); `enforce_eager` skips ~30 s of graph compilation on CPU. `dtype` means what it means
    for vLLM's own CPU kernels: "auto" and "fast" are bfloat16 on a CPU with native bf16 (AVX512-BF16 or AMX),
    else float32."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "default"
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: int = Field(1, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    speculative_config: dict[str, Any] | None = None  # vLLM's; fot.decoding.kangaroo_vllm.KANGAROO_VLLM for Kangaroo
    kangaroo_adapter: str | Path | None = None  # adapter folder for the Kangaroo proposer (default: the shipped one)
    seed: int = 0
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vllm.EngineArgs field


def vllm_environment(kv_cache_gib: int) -> None:
    """Environment vLLM reads at start-up: in-process engine core, caches in the project cache, quiet logs."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@contextlib.contextmanager
def adapter_environment(folder: Path | None):
    """`FOT_KANGAROO_ADAPTER` while vLLM builds its proposer, then as it was: a later backend in the process does
    not inherit this one's adapter."""
    before = os.environ.get(ADAPTER_ENV)
    if folder is not None:
        os.environ[ADAPTER_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ADAPTER_ENV, None)
        else:
            os.environ[ADAPTER_ENV] = before


class _UsageLogger:
    """A vLLM stat logger that adds each engine step to our counters: one step is one model forward."""

    def __init__(self, usage: Usage):
        self.usage = usage

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if iteration_stats is not None and iteration_stats.num_generation_tokens + iteration_stats.num_prompt_tokens:
            self.usage.forward_passes += 1
        spec = scheduler_stats.spec_decoding_stats if scheduler_stats is not None else None
        if spec is not None:
            self.usage.draft_tokens += spec.num_draft_tokens
            self.usage.accepted_tokens += spec.num_accepted_tokens

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMBackend(WorkerBackend):
    name = "vllm"

    def __init__(self, config: VLLMConfig | dict | None = None, **options):
        super().__init__()
        self.config = c = self.parse_config(VLLMConfig, config, options)
        adapter = None
        if c.kangaroo_adapter is not None:
            if (c.speculative_config or {}).get("model") != KANGAROO_VLLM["model"]:
                raise InvalidRequestError("kangaroo_adapter needs speculative_config=KANGAROO_VLLM (its proposer)")
            adapter = adapter_folder(c.kangaroo_adapter)  # before vLLM loads the model
        folder = resolve_model(c.model)
        vllm_environment(c.kv_cache_gib)
        try:
            from vllm import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as e:
            raise ModelError(f"the vLLM backend needs vLLM (`pip install 'fot[vllm]'`): {e}") from None
        from transformers import AutoTokenizer

        from fot.speculative.kernels import resolve_dtype

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        dtype = str(resolve_dtype(c.dtype, "cpu", ours=False)).removeprefix("torch.")
        args = EngineArgs(
            model=str(folder),
            dtype=dtype,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            enable_prefix_caching=c.enable_prefix_caching,
            enforce_eager=c.enforce_eager,
            speculative_config=c.speculative_config,
            seed=c.seed,
            disable_log_stats=False,  # our stat logger counts forwards and drafts
            **c.engine_kwargs,
        )
        self._ids = itertools.count()

        def build() -> Any:
            return LLMEngine.from_engine_args(args, stat_loggers=[lambda cfg, idx=0: _UsageLogger(self.usage)])

        try:
            with adapter_environment(adapter):
                self.engine = self.start_worker(build, "fot-vllm")
        except Exception as e:
            raise ModelError(f"vLLM could not start on {folder}: {type(e).__name__}: {e}") from e
        self.context = self.engine.model_config.max_model_len

    def prepare(self, request: Request) -> tuple[list[int], Any]:
        """The prompt's ids and vLLM's sampling params, both checked before any request goes to the engine."""
        from fot.speculative.prompts import encode_prompt

        ids = encode_prompt(self.tokenizer, request.prompt)
        check_context(len(ids), request, self.context)
        try:
            return ids, self.sampling_params(request)
        except Exception as e:  # vLLM's own validation error is no ValueError
            raise InvalidRequestError(f"vLLM refuses these sampling options: {e}") from None

    def sampling_params(self, request: Request):
        """vLLM's params for a request (greedy: one sample, which `_completion` copies)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        return VSamplingParams(
            n=distinct_samples(p),
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            max_tokens=p.max_tokens,
            stop=list(p.stop) or None,
            seed=p.seed,
            logprobs=0 if p.logprobs else None,  # 0: the sampled token's own log-prob only
            ignore_eos=p.ignore_eos,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _generate(self, requests: list[Request], prepared: list[tuple[list[int], Any]]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        futures, rids = [], []
        for r, (ids, params) in zip(requests, prepared, strict=True):
            fut, rid = loop.create_future(), f"fot-{next(self._ids)}"
            self.send((rid, ids, params, r.params.n, fut, loop))
            futures.append(fut)
            rids.append(rid)
        try:
            return await self.wait(futures)
        except asyncio.CancelledError:  # the caller went away: vLLM drops its requests and frees their blocks
            await self.drop(rids)
            raise

    def serve(self, engine: Any) -> None:
        """The worker's loop: add what arrived, step the engine, hand finished requests back; block when idle."""
        from vllm.inputs import TokensPrompt

        waiting: dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop, int]] = {}
        closing = False
        while True:
            try:
                item = self.inbox.get(block=not (closing or engine.has_unfinished_requests()))
            except queue.Empty:
                item = ()
            while True:
                if item is None:  # close(): finish what is in flight first
                    closing = True
                elif isinstance(item, Drop):
                    engine.abort_request([rid for rid in item.what if waiting.pop(rid, None)])
                    item.done.set_result(None)
                elif item:
                    rid, ids, params, n, fut, loop = item
                    try:
                        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
                        waiting[rid] = (fut, loop, n)
                    except Exception as e:  # vLLM refused this request: it fails alone
                        settle(loop, fut, Completion(error=f"vLLM refused it: {e}", refused=True))
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if not engine.has_unfinished_requests():
                if closing:
                    return
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # the engine broke: everything in flight fails with the cause, and leaves it
                for fut, loop, _ in waiting.values():
                    settle(loop, fut, Completion(error=f"vLLM failed: {type(e).__name__}: {e}"))
                with contextlib.suppress(Exception):  # else vLLM would step them again, for nobody
                    engine.abort_request(list(waiting))
                waiting.clear()
                continue
            for out in outputs:
                if out.finished and out.request_id in waiting:
                    fut, loop, n = waiting.pop(out.request_id)
                    settle(loop, fut, _completion(out, n))

    async def close(self) -> None:
        await super().close()
        self.engine = None


def _completion(out, n: int) -> Completion:
    """A finished vLLM request as a Completion of `n` samples (a greedy one copied n times); a sample that ended
    other than by a stop or its length (aborted, an engine error) fails the request."""
    outputs = []
    for o in sorted(out.outputs, key=lambda o: o.index):
        if o.finish_reason not in ("stop", "length"):
            return Completion(error=f"vLLM ended a sample with finish reason {o.finish_reason!r}")
        logprobs = [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)] if o.logprobs else None
        outputs.append(
            Output(text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason, logprobs=logprobs)
        )
    return Completion(prompt_tokens=len(out.prompt_token_ids), outputs=outputs * (n // len(outputs)))
