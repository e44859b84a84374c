"""Worker-side reporting: receipts and task events sent on the session stream, each answered by a verdict.

Events go out by group commit: whatever is queued when the writer is free goes in one message, so
a receipt never waits behind a timer and, under load, many events share a write. Every event waits
for its verdict; one that was sent on a stream that then broke is sent again on the next stream of
the same session (the dispatcher answers a repeat as it answered the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from sluicegate.v1 import worker_pb2

Verdict = worker_pb2.EventVerdict
Key = tuple[str, int]


class SessionLost(Exception):
    """The dispatcher no longer knows this session: register again."""


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.failures))

    def reset(self) -> None:
        self.failures = 0


class Reporter:
    """The events of one session and their verdicts; `pump` writes them to the current stream."""

    MAX_EVENTS = 1000

    def __init__(self, max_bytes: int, heartbeat: float) -> None:
        self._max_bytes = max_bytes
        self._heartbeat = heartbeat
        self._queue: list[worker_pb2.TaskEvent] = []
        self._waiting: dict[Key, tuple[worker_pb2.TaskEvent, asyncio.Future[int]]] = {}
        self._wake = asyncio.Event()
        self.lost = False
        self.sent = 0
        self._leaving = False
        self.left = asyncio.Event()  # the dispatcher has been told this worker is shutting down
        self._pong = 0  # the dispatcher's last probe of our reading, carried back by every message
        self._answered = 0  # the last probe a message carried back

    async def report(self, event: worker_pb2.TaskEvent) -> int:
        """Send an event; returns the dispatcher's verdict on it (STALE if the session is lost)."""
        if self.lost:
            return Verdict.VERDICT_STALE
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[(event.task_id, event.attempt)] = (event, future)
        self._queue.append(event)
        self._wake.set()
        return await future

    def answered(self, verdicts: Any) -> None:
        for verdict in verdicts:
            waiting = self._waiting.pop((verdict.task_id, verdict.attempt), None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_result(verdict.verdict)

    def _take(self) -> list[worker_pb2.TaskEvent]:
        """The oldest events that fit one message (one at least): outputs can be large."""
        size, count = 0, 0
        for event in self._queue[: self.MAX_EVENTS]:
            size += event.ByteSize() + 8
            if count and size > self._max_bytes:
                break
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    async def pump(self, call: Any) -> None:
        """Write queued events to `call` as they come, and a heartbeat when nothing else went for a while."""
        while True:
            if not self._queue and self._pong == self._answered:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat):
                        await self._wake.wait()
            batch = self._take()
            leaving, pong = self._leaving and not self._queue, self._pong
            await call.write(worker_pb2.WorkerMessage(events=batch, leaving=leaving, pong=pong))
            self._answered = pong
            self.sent += len(batch)
            if self._leaving and not self._queue:
                self.left.set()
                await asyncio.Event().wait()  # nothing more to say; the session ends from the worker's side

    def pinged(self, number: int) -> None:
        """The dispatcher probed our reading: answer at once (the answer is what proves we read)."""
        self._pong = number
        self._wake.set()

    def leave(self) -> None:
        """Tell the dispatcher, with the next message, that the worker is shutting down on purpose."""
        self._leaving = True
        self._wake.set()

    def stream_ended(self) -> None:
        """Events sent on a stream that broke go again on the next one, in their order."""
        queued = {id(e) for e in self._queue}
        again = [event for event, future in self._waiting.values() if not future.done() and id(event) not in queued]
        self._queue = again + self._queue

    def fail_all(self) -> None:
        self.lost = True
        for _, future in self._waiting.values():
            if not future.done():
                future.set_result(Verdict.VERDICT_STALE)
        self._waiting.clear()
        self._queue.clear()
