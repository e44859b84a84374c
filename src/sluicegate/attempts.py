"""The attempts a worker runs: each acknowledged before its handler starts, run within the task's
timeout (which the handler can extend), and its end reported; the dispatcher can stop any of them."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanKind

from sluicegate import telemetry
from sluicegate.errors import InvalidInput, PermanentError
from sluicegate.reporting import Reporter
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate.wire import now_ms
from sluicegate.worker_settings import WorkerSettings

Event = worker_pb2.TaskEvent
Verdict = worker_pb2.EventVerdict
Key = tuple[str, int]


@dataclass(slots=True)
class TaskContext:
    """What a handler gets: the task's identity and payload, and a way to ask for more time.

    When the task is cancelled (by a client, or because it ran out of time) the handler is
    cancelled: it sees CancelledError, and `cancel_reason` says why, so that it can clean up.
    """

    task_id: str
    attempt: int
    action: str
    payload: bytes
    tenant: str
    worker_id: str
    cancel_reason: str = ""
    _extend: Callable[[float], Awaitable[bool]] | None = field(default=None, repr=False)

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None

    async def extend(self, seconds: float) -> bool:
        """Ask for `seconds` more before the dispatcher gives up on this run (a progress heartbeat).

        Returns False if the dispatcher no longer holds the attempt (it was cancelled or reassigned).
        """
        if self._extend is None or not 0 < seconds <= 24 * 3600:
            raise InvalidInput("extend takes a number of seconds between 0 and 24 hours")
        return await self._extend(seconds)


Handler = Callable[[TaskContext], Awaitable[Any]]


@dataclass(slots=True)
class WorkerStats:
    received: int = 0
    duplicates: int = 0
    stale: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    reconnects: int = 0
    registrations: int = 0


def _encode(output: Any) -> bytes:
    if output is None:
        return b""
    if isinstance(output, bytes):
        return output
    if isinstance(output, str):
        return output.encode()
    return json.dumps(output).encode()


class Attempts:
    """The attempts running now, and those seen lately: a duplicate (task, attempt) runs once."""

    def __init__(self, worker_id: str, settings: WorkerSettings, stats: WorkerStats) -> None:
        self.worker_id, self.settings, self.stats = worker_id, settings, stats
        self.handlers: dict[str, Handler] = {}
        self.running: dict[Key, asyncio.Task[None]] = {}
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self._stops: dict[Key, str] = {}  # attempts the dispatcher told us to stop, and why
        self._contexts: dict[Key, TaskContext] = {}  # of handlers running now

    def stop(self, key: Key, reason: str) -> None:
        """The dispatcher said stop this attempt: its handler is cancelled, told why."""
        running = self.running.get(key)
        if running is None or key in self._stops:
            return
        self._stops[key] = reason or "cancelled"
        context = self._contexts.get(key)
        if context is not None:
            context.cancel_reason = self._stops[key]  # readable by the handler as it is cancelled
        running.cancel()

    def accept(self, assignment: messages_pb2.Assignment, reporter: Reporter) -> None:
        key = (assignment.task.task_id, assignment.attempt)
        if key in self._seen:
            self.stats.duplicates += 1
            return
        self._seen[key] = None
        if len(self._seen) > 100_000:
            self._seen.popitem(last=False)
        self.stats.received += 1
        # Not in the session's task group: on a graceful stop, handlers outlive the stream.
        task = asyncio.create_task(self._run_one(assignment, reporter))
        self.running[key] = task
        task.add_done_callback(lambda _: self.running.pop(key, None))

    async def _run_one(self, assignment: messages_pb2.Assignment, reporter: Reporter) -> None:
        task = assignment.task
        span = telemetry.start(
            f"run {task.action}",
            assignment.trace,
            kind=SpanKind.CONSUMER,
            attributes=telemetry.task_attributes(
                task.task_id,
                assignment.attempt,
                **{"sluicegate.worker.id": self.worker_id, "messaging.operation.type": "process"},
            ),
        )
        try:
            await self._run_traced(assignment, reporter, span)
        finally:
            span.end()

    async def _run_traced(self, assignment: messages_pb2.Assignment, reporter: Reporter, span: Any) -> None:
        task = assignment.task
        key = (task.task_id, assignment.attempt)
        final = Event(task_id=task.task_id, attempt=assignment.attempt)
        try:
            received = Event(task_id=key[0], attempt=key[1], kind=Event.KIND_RECEIVED, at_ms=now_ms())
            if await reporter.report(received) != Verdict.VERDICT_ACCEPTED:
                self.stats.stale += 1  # superseded before we started: another worker has it
                telemetry.fail(span, "attempt superseded before it started")
                return
            await self._run_handler(assignment, reporter, final)
        except asyncio.CancelledError:
            reason = self._stops.pop(key, None)
            current = asyncio.current_task()
            if reason is None or current is None:
                raise  # the worker is stopping: not a cancellation of this task
            current.uncancel()  # the dispatcher's, handled: the handler was stopped, say so
            final.kind, final.error = Event.KIND_CANCELLED, reason
        finally:
            self._stops.pop(key, None)
        final.at_ms = now_ms()
        if final.kind in (Event.KIND_FAILED, Event.KIND_CANCELLED):
            telemetry.fail(span, final.error[:200])
        verdict = await reporter.report(final)
        if verdict != Verdict.VERDICT_ACCEPTED:
            self.stats.stale += 1
        elif final.kind == Event.KIND_COMPLETED:
            self.stats.completed += 1
        elif final.kind == Event.KIND_CANCELLED:
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1

    async def _run_handler(self, assignment: messages_pb2.Assignment, reporter: Reporter, final: Any) -> None:
        task = assignment.task
        limit: list[asyncio.Timeout] = []

        async def extend(seconds: float) -> bool:
            progress = Event(
                task_id=task.task_id,
                attempt=assignment.attempt,
                kind=Event.KIND_PROGRESS,
                extend_ms=round(seconds * 1000),
            )
            granted = await reporter.report(progress) == Verdict.VERDICT_ACCEPTED
            if granted and limit and limit[0].when() is not None:  # the dispatcher moved its deadline; so do we
                limit[0].reschedule(asyncio.get_running_loop().time() + seconds)
            return granted

        handler = self.handlers.get(task.action)
        context = TaskContext(
            task_id=task.task_id,
            attempt=assignment.attempt,
            action=task.action,
            payload=task.payload,
            tenant=task.tenant,
            worker_id=self.worker_id,
            _extend=extend,
        )
        key = (task.task_id, assignment.attempt)
        self._contexts[key] = context
        try:
            if handler is None:
                raise PermanentError(f"this worker has no handler for {task.action!r}")
            async with asyncio.timeout(task.timeout_ms / 1000 if task.timeout_ms else None) as own:
                limit.append(own)
                output = await handler(context)
            encoded = _encode(output)
            if len(encoded) > self.settings.max_payload_bytes:
                raise PermanentError(f"output is {len(encoded)} bytes; the limit is {self.settings.max_payload_bytes}")
            final.kind, final.output = Event.KIND_COMPLETED, encoded
        except TimeoutError:
            final.kind, final.error, final.retryable = Event.KIND_FAILED, "ran past its timeout", True
        except PermanentError as err:
            final.kind, final.error, final.retryable = Event.KIND_FAILED, str(err), False
        except Exception as err:
            final.kind, final.error, final.retryable = Event.KIND_FAILED, f"{type(err).__name__}: {err}", True
        finally:
            self._contexts.pop(key, None)
