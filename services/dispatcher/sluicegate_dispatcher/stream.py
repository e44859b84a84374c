"""One open Listen stream of a worker session, with the send lock that guards its writes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sluicegate.errors import StreamBroken
from sluicegate_dispatcher.lock import TimedLock


class WorkerStream:
    """A worker's open stream; writes go through `send`, one at a time per permit, in arrival order."""

    __slots__ = ("_context", "ended", "lock", "reason")

    def __init__(self, context: Any, permits: int = 1) -> None:
        self._context = context
        self.lock = TimedLock(permits)
        self.ended = asyncio.Event()
        self.reason = ""

    def end(self, reason: str) -> None:
        """Close the stream (the worker reconnects); the first reason given is kept."""
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()

    async def send(self, message: Any, timeout: float) -> float:
        """Acquire the lock within `timeout` (LockTimeout otherwise), hold it until the write finished.

        Returns how long the lock was waited for, measured from before the acquisition.
        """
        if self.ended.is_set():
            raise StreamBroken(self.reason or "stream ended")
        started = time.perf_counter()
        await self.lock.acquire(timeout)
        waited = time.perf_counter() - started
        try:
            if self.ended.is_set():
                raise StreamBroken(self.reason or "stream ended")
            try:
                await self._context.write(message)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise StreamBroken("stream write failed") from err
        finally:
            self.lock.release()
        return waited
