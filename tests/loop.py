"""Whether the event loop goes on while a search waits on slow work (a comparison, a check): what a server's other
requests and streams need."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def ticks_during(work: Awaitable[T]) -> tuple[T, int]:
    """The work's result, and how many 10 ms sleeps the event loop finished meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work, ticks
    finally:
        ticker.cancel()
