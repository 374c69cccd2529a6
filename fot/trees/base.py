"""What every tree shares: a networkx graph of nodes, and the batcher that turns one search step of many trees
into ONE backend call.

Trees are written as plain sequential coroutines (`await gen(requests)`); the `Batcher` holds each call until every
tree still taking part in the step is waiting, then sends all their requests together. So the speculative engine
sees one large batch per phase of a step, deterministically, whatever the timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import networkx as nx

from fot.decoding.base import Backend, BackendError, Completion, Request

Generate = Callable[[list[Request]], Awaitable[list[Completion]]]


@runtime_checkable
class Tree(Protocol):
    """What the forest asks of a tree, whatever its search (MCTSr on math, ToT on Game of 24): a new kind of tree
    plugs in by being one."""

    tree: TreeGraph
    corrections: int  # steps the tree repaired by its own checks (the forest's corrector counts its own)

    @property
    def done(self) -> bool: ...

    async def start(self, gen: Generate) -> None: ...

    async def step(self, gen: Generate) -> None: ...

    def score(self) -> float:
        """How promising the tree is: sparse activation expands the best."""
        ...

    def answer(self) -> str | None: ...

    def answer_node(self) -> int | None: ...

    def remaining_steps(self) -> int:
        """Steps the tree would still run: what pruning it saves."""
        ...


class Batcher:
    """A barrier in front of a backend: `generate` calls from `participants` coroutines are sent as one batch once
    all of those still running are waiting. A coroutine that finishes its step must `leave()`. With `lockstep`
    False each call goes to the backend at once: a tree whose answer was short moves on without waiting for the
    others, and the backend's own continuous batching merges what arrives together."""

    def __init__(
        self,
        backend: Backend,
        participants: int,
        meter: Callable[[list[Request], list[Completion]], None] | None = None,
        lockstep: bool = True,
    ):
        self.backend, self.participants, self.meter, self.lockstep = backend, participants, meter, lockstep
        self.waiting: list[tuple[list[Request], asyncio.Future]] = []
        self.calls = 0  # backend calls made: one per phase of a step
        self.tasks: set[asyncio.Task] = set()

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((list(requests), fut))
        self._maybe_flush()
        return await fut

    def leave(self) -> None:
        self.participants -= 1
        self._maybe_flush()

    async def cancel(self) -> None:
        """Cancel the batches in flight (their search was cancelled) and wait until the backend has dropped their
        requests, so that a cancelled search has no work left in the engine once its cancellation ends."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _maybe_flush(self) -> None:
        if self.waiting and (not self.lockstep or len(self.waiting) >= self.participants):
            batch = [(reqs, fut) for reqs, fut in self.waiting if not fut.done()]  # not the cancelled trees' calls
            self.waiting = []
            task = asyncio.ensure_future(self._flush(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _flush(self, batch: list[tuple[list[Request], asyncio.Future]]) -> None:
        requests = [r for reqs, _ in batch for r in reqs]
        try:
            done = await self.backend.generate(requests) if requests else []
            if len(done) != len(requests):
                raise BackendError(f"{self.backend.name} returned {len(done)} completions for {len(requests)} requests")
            if requests:
                self.calls += 1
                if self.meter is not None:
                    self.meter(requests, done)
        except Exception as e:  # bad requests, a stopped backend: every caller of this batch gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        start = 0
        for reqs, fut in batch:
            if not fut.done():
                fut.set_result(done[start : start + len(reqs)])
            start += len(reqs)


async def run_step(batcher: Batcher, coroutines: Sequence) -> list:
    """Run one step of several trees against one batcher; each tree leaves the barrier when its step ends. Should
    one tree raise, the others are cancelled before the error goes on: no tree searches on for a failed solve."""

    async def one(coro):
        try:
            return await coro
        finally:
            batcher.leave()

    tasks = [asyncio.ensure_future(one(c)) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class TreeGraph:
    """A reasoning tree as a `networkx.DiGraph`: node ids are ints in creation order, attributes are plain data
    (text, answer, scores), so a tree can be inspected, exported (`to_dict`) and drawn."""

    def __init__(self, name: str):
        self.graph = nx.DiGraph(name=name)

    def add(self, parent: int | None = None, **attrs) -> int:
        node = self.graph.number_of_nodes()
        self.graph.add_node(node, **attrs)
        if parent is not None:
            self.graph.add_edge(parent, node)
        return node

    def __getitem__(self, node: int) -> dict:
        return self.graph.nodes[node]

    def children(self, node: int) -> list[int]:
        return list(self.graph.successors(node))

    def parent(self, node: int) -> int | None:
        return next(iter(self.graph.predecessors(node)), None)

    def nodes(self) -> list[int]:
        return list(self.graph.nodes)

    def to_dict(self) -> dict:
        return nx.node_link_data(self.graph, edges="edges")
