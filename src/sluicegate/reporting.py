"""Worker-side reporting: receipts and task events sent to the dispatcher in batches, with backoff."""

from __future__ import annotations

import asyncio
import random

import grpc

from sluicegate.v1 import worker_pb2, worker_pb2_grpc

Verdict = worker_pb2.EventVerdict


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
    """Sends events of one session in batches; each caller awaits its own verdict."""

    MAX_EVENTS = 1000
    MAX_IN_FLIGHT = 2

    def __init__(
        self, stub: worker_pb2_grpc.WorkerServiceAsyncStub, worker_id: str, session_id: str, max_bytes: int
    ) -> None:
        self._stub, self._worker_id, self._session_id = stub, worker_id, session_id
        self._max_bytes = max_bytes
        self._in_flight = asyncio.Semaphore(self.MAX_IN_FLIGHT)
        self._queue: list[tuple[worker_pb2.TaskEvent, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self.lost = False

    async def report(self, event: worker_pb2.TaskEvent) -> int:
        if self.lost:
            return Verdict.VERDICT_STALE
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        self._wake.set()
        return await future

    def _take_batch(self) -> list[tuple[worker_pb2.TaskEvent, asyncio.Future[int]]]:
        """The oldest events that fit in one request (at least one): outputs can be large."""
        size, count = 0, 0
        for event, _ in self._queue[: self.MAX_EVENTS]:
            size += event.ByteSize() + 8
            if count and size > self._max_bytes:
                break
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    def fail_all(self) -> None:
        self.lost = True
        for _, future in self._queue:
            if not future.done():
                future.set_result(Verdict.VERDICT_STALE)
        self._queue.clear()

    async def run(self) -> None:
        """Send queued events, several requests in flight so receipts never wait behind results."""
        async with asyncio.TaskGroup() as group:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await self._in_flight.acquire()
                    group.create_task(self._send(self._take_batch()))

    async def _send(self, batch: list[tuple[worker_pb2.TaskEvent, asyncio.Future[int]]]) -> None:
        try:
            await self._send_until_answered(batch)
        finally:
            self._in_flight.release()

    async def _send_until_answered(self, batch: list[tuple[worker_pb2.TaskEvent, asyncio.Future[int]]]) -> None:
        backoff = Backoff()
        request = worker_pb2.ReportRequest(
            worker_id=self._worker_id, session_id=self._session_id, events=[e for e, _ in batch]
        )
        while True:
            try:
                response = await self._stub.Report(request, timeout=30)
            except grpc.aio.AioRpcError as err:
                # Refused as such (too large, malformed): retrying the same batch cannot help.
                refused = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if err.code() == grpc.StatusCode.NOT_FOUND or err.code() in refused:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(Verdict.VERDICT_STALE)
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        self.fail_all()
                        raise SessionLost from err
                    return
                if self.lost:
                    return
                await asyncio.sleep(backoff.next())  # unavailable for now: the same events again
                continue
            for (_, future), verdict in zip(batch, response.verdicts, strict=False):
                if not future.done():
                    future.set_result(verdict.verdict)
            return
