"""The per-stream send lock: a first-come-first-served semaphore acquired under a timeout."""

from __future__ import annotations

import asyncio
from collections import deque

from sluicegate.errors import LockTimeout


def _expire(waiter: asyncio.Future[None]) -> None:
    # A waiter that was handed the lock a moment before its timer fired keeps the lock.
    if not waiter.done():
        waiter.set_exception(LockTimeout("send lock not acquired in time"))


class TimedLock:
    """A semaphore whose waiters are served in arrival order and give up after a timeout.

    The free path takes the lock without arming any timer. Release hands the lock directly to the
    oldest live waiter, so a newcomer can never overtake someone already waiting.

    Invariant: while permits are free, no live waiter exists (a waiter enqueues only when none
    are free, and a release with a live waiter hands its permit over instead of freeing it).
    """

    __slots__ = ("_permits", "_waiters")

    def __init__(self, permits: int = 1) -> None:
        if permits < 1:
            raise ValueError("a lock needs at least one permit")
        self._permits = permits
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._permits == 0

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self, timeout: float) -> None:
        """Take a permit, waiting at most `timeout` seconds; raise LockTimeout otherwise."""
        if self._permits > 0:
            if self._waiters:  # only dead waiters can be left while permits are free
                self._waiters.clear()
            self._permits -= 1
            return
        if timeout <= 0:
            raise LockTimeout("send lock busy")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed the lock, then cancelled before resuming: pass it on
            raise
        finally:
            timer.cancel()

    def release(self) -> None:
        """Hand the permit to the oldest live waiter, or free it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._permits += 1
