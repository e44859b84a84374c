"""The dispatcher's per-stream send lock alone (`TimedLock`), on the running event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from sluicegate_dispatcher.lock import TimedLock

TIMEOUT = 0.25  # the dispatcher's default send-lock timeout


@dataclass(slots=True)
class LockFigures:
    uncontended_per_s: float
    contended_handoffs_per_s: float
    contenders: int
    handoffs: int
    reference_semaphore_per_s: float  # asyncio.Semaphore, uncontended, for scale


async def uncontended(n: int) -> float:
    """Acquisitions per second of a free lock (acquire with the timeout, then release)."""
    lock = TimedLock()
    started = time.perf_counter()
    for _ in range(n):
        await lock.acquire(TIMEOUT)
        lock.release()
    return n / (time.perf_counter() - started)


async def semaphore_reference(n: int) -> float:
    semaphore = asyncio.Semaphore(1)
    started = time.perf_counter()
    for _ in range(n):
        await semaphore.acquire()
        semaphore.release()
    return n / (time.perf_counter() - started)


async def contended(n: int, contenders: int = 4) -> tuple[float, int]:
    """Handoffs per second with `contenders` tasks ping-ponging one lock.

    Each holder keeps the lock across one turn of the event loop, so the others are queued as
    waiters and every release hands the lock to the oldest of them (armed timer and all).
    Returns (handoffs per second, handoffs).
    """
    lock = TimedLock()
    handoffs = 0
    done = 0

    async def player() -> None:
        nonlocal handoffs, done
        while done < n:
            had_to_wait = lock.locked()
            await lock.acquire(TIMEOUT * 4)
            handoffs += had_to_wait
            done += 1
            await asyncio.sleep(0)
            lock.release()

    started = time.perf_counter()
    await asyncio.gather(*(player() for _ in range(contenders)))
    elapsed = time.perf_counter() - started
    return handoffs / elapsed, handoffs


async def run_lock_bench(n: int = 200_000, contenders: int = 4) -> LockFigures:
    await uncontended(min(n, 10_000))  # warm up
    fast = max([await uncontended(n) for _ in range(3)])
    reference = max([await semaphore_reference(n) for _ in range(3)])
    best = (0.0, 0)
    for _ in range(3):
        best = max(best, await contended(max(1, n // 4), contenders))
    return LockFigures(
        uncontended_per_s=fast,
        contended_handoffs_per_s=best[0],
        contenders=contenders,
        handoffs=best[1],
        reference_semaphore_per_s=reference,
    )
