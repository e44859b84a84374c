"""One open Session stream of a worker, with the send lock that guards its writes.

Everything the dispatcher tells a worker - assignments, verdicts on its events, controls - is a
write under the stream's timed lock. Verdicts do not take a write of their own when one is going
out anyway: they queue, ride along with the next assignment write, or are flushed by one writer
task as soon as the lock is free (group commit, no timer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sluicegate.errors import LockTimeout, StreamBroken
from sluicegate.v1 import worker_pb2
from sluicegate_dispatcher.lock import TimedLock


class WorkerStream:
    """A worker's open stream; writes go through `send`, one at a time per permit, in arrival order."""

    __slots__ = (
        "_context",
        "_controls",
        "_flusher",
        "_on_stall",
        "_permits",
        "_ping",
        "_timeout",
        "_verdicts",
        "ended",
        "lock",
        "reason",
    )

    def __init__(
        self,
        context: Any,
        permits: int = 1,
        *,
        lock_timeout: float = 0.25,
        on_stall: Callable[[WorkerStream], bool] = lambda _stream: True,
    ) -> None:
        self._context = context
        self.lock = TimedLock(permits)
        self._permits = permits
        self.ended = asyncio.Event()
        self.reason = ""
        self._timeout = lock_timeout
        # Called when a verdict flush could not get the lock in time: True if the stream stalled
        # (the flush gives up), False to wait on.
        self._on_stall = on_stall
        self._verdicts: list[worker_pb2.EventVerdict] = []
        self._controls: list[worker_pb2.Control] = []
        self._ping = 0  # a probe of the worker's reading, to go out with the next write
        self._flusher: asyncio.Task[None] | None = None

    def end(self, reason: str) -> None:
        """Close the stream (the worker reconnects); the first reason given is kept."""
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()

    async def quiesce(self, timeout: float) -> bool:
        """End the stream and wait up to `timeout` for a write in flight to finish; False if it did not.

        The permits are kept: nothing is written after this, so the call's status can be sent.
        """
        self.end(self.reason or "stream ended")
        try:
            for _ in range(self._permits):
                await self.lock.acquire(timeout)
        except LockTimeout:
            return False
        return True

    async def send(self, message: worker_pb2.ServerMessage, timeout: float) -> float:
        """Acquire the lock within `timeout` (LockTimeout otherwise), hold it until the write finished.

        Verdicts waiting to go out ride along. Returns how long the lock was waited for.
        """
        waited = await self.acquire(timeout)
        try:
            await self.write_held(message)
        finally:
            self.release()
        return waited

    async def acquire(self, timeout: float) -> float:
        """Take the send lock within `timeout` (LockTimeout otherwise); returns how long it took.

        StreamBroken if the stream ended. The caller writes with `write_held`, then `release`s.
        """
        if self.ended.is_set():
            raise StreamBroken(self.reason or "stream ended")
        started = time.perf_counter()
        await self.lock.acquire(timeout)
        return time.perf_counter() - started

    def release(self) -> None:
        self.lock.release()

    async def write_held(self, message: worker_pb2.ServerMessage) -> None:
        """One write, by the holder of the send lock; verdicts, controls and a probe waiting to go out ride along."""
        if self.ended.is_set():
            raise StreamBroken(self.reason or "stream ended")
        if self._verdicts:
            message.verdicts.extend(self._verdicts)
            self._verdicts = []
        if self._controls:
            message.controls.extend(self._controls)
            self._controls = []
        if self._ping:
            message.ping, self._ping = self._ping, 0
        try:
            await self._context.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise StreamBroken("stream write failed") from err

    def answer(self, verdicts: list[worker_pb2.EventVerdict]) -> None:
        """Queue verdicts for the worker; they go out with the next write, or on their own at once."""
        if self.ended.is_set() or not verdicts:
            return
        self._verdicts.extend(verdicts)
        self._kick()

    def tell(self, controls: list[worker_pb2.Control]) -> None:
        """Queue controls (cancel an attempt) the same way."""
        if self.ended.is_set() or not controls:
            return
        self._controls.extend(controls)
        self._kick()

    def ping(self, number: int) -> None:
        """Probe the worker's reading: `number` goes out with the next write, or on its own at once."""
        if self.ended.is_set():
            return
        self._ping = number
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while (self._verdicts or self._controls or self._ping) and not self.ended.is_set():
            try:
                await self.lock.acquire(self._timeout)
            except LockTimeout:
                if self._on_stall(self):
                    return
                continue
            try:
                if self._verdicts or self._controls or self._ping:
                    await self.write_held(worker_pb2.ServerMessage())
            except StreamBroken:
                self.end("stream write failed; reconnect")
                return
            finally:
                self.lock.release()
