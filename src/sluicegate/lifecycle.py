"""Lifecycle events off the hot path: every role emits what happened to a task; the recorder keeps it.

`LifecycleEmitter.emit` only appends to a bounded buffer. One background loop publishes whatever
is buffered when it wakes as one `LifecycleBatch` (a group commit: the longer a publish takes, the
more the next one carries, and no timer is ever armed on the fast path) to the `events` exchange
with a `lifecycle.<source>` routing key, with publisher confirms and retries. The publish is not
mandatory: with no recorder queue bound there is nobody to keep the events for. A retry after a
lost confirm may duplicate a batch; event ids are stable per happening, so the recorder applies
each happening once. A full buffer drops its oldest events, counts them and warns once per episode:
the record of a task is worth less than the task itself, and the hot path must never wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeAlias

from aio_pika.abc import AbstractExchange
from prometheus_client.core import Metric
from pydantic import Field
from pydantic_settings import BaseSettings

from sluicegate import amqp
from sluicegate.errors import PublishError, Unroutable
from sluicegate.metrics import counter, gauge, labelled_counter
from sluicegate.settings import settings_config
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

log = logging.getLogger(__name__)

LifecycleEvent = messages_pb2.LifecycleEvent
K = messages_pb2.LifecycleEvent
KindValue: TypeAlias = messages_pb2.LifecycleEvent.Kind.ValueType

# The lower-case names used in event ids, routing keys and task records.
KIND_NAMES: dict[KindValue, str] = {
    value: name.removeprefix("KIND_").lower()
    for name, value in messages_pb2.LifecycleEvent.Kind.items()
    if value != K.KIND_UNSPECIFIED
}
KINDS_BY_NAME = {name: value for value, name in KIND_NAMES.items()}
# Kinds whose event id carries the reason: one attempt can wait or come back for several reasons.
_REASONED = frozenset({K.KIND_WAITING, K.KIND_REQUEUED})
_RESULT_KINDS = {
    messages_pb2.TASK_STATUS_COMPLETED: K.KIND_COMPLETED,
    messages_pb2.TASK_STATUS_FAILED: K.KIND_FAILED,
    messages_pb2.TASK_STATUS_DEAD: K.KIND_DEAD,
    messages_pb2.TASK_STATUS_REJECTED: K.KIND_REJECTED,
    messages_pb2.TASK_STATUS_EXPIRED: K.KIND_EXPIRED,
    messages_pb2.TASK_STATUS_CANCELLED: K.KIND_CANCELLED,
}


class LifecycleSettings(BaseSettings):
    """How a role buffers and batches its lifecycle events; SLUICEGATE_LIFECYCLE_* variables."""

    model_config = settings_config("SLUICEGATE_LIFECYCLE_")

    buffer: int = Field(
        default=100_000, ge=1, le=10_000_000, description="Events held while the broker is slow; then the oldest go."
    )
    max_batch: int = Field(default=1000, ge=1, le=100_000, description="Most events in one AMQP message.")
    max_batch_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Most bytes of events in one AMQP message."
    )


def event_id(task_id: str, attempt: int, kind: KindValue, reason: str = "") -> str:
    """The id of one happening: the same task, attempt, kind (and reason, for waits and requeues)."""
    name = KIND_NAMES.get(kind, str(kind))
    if reason and kind in _REASONED:
        return f"{task_id}/{attempt}/{name}/{reason}"
    return f"{task_id}/{attempt}/{name}"


def task_event(
    kind: KindValue,
    task: messages_pb2.Task,
    *,
    attempt: int = 0,
    reason: str = "",
    detail: str = "",
    error: str = "",
    worker_id: str = "",
    dispatcher_id: str = "",
    at_ms: int | None = None,
    include_task: bool = False,
) -> messages_pb2.LifecycleEvent:
    """An event about a task that has no assignment (yet): submitted, waiting, rejected, expired.

    `attempt` is the latest attempt made so far: 0 before the first assignment.
    `include_task` puts the task as submitted into the event (for SUBMITTED).
    """
    event = LifecycleEvent(
        event_id=event_id(task.task_id, attempt, kind, reason),
        task_id=task.task_id,
        attempt=attempt,
        kind=kind,
        at_ms=now_ms() if at_ms is None else at_ms,
        tenant=task.tenant,
        action=task.action,
        worker_id=worker_id,
        dispatcher_id=dispatcher_id,
        reason=reason,
        detail=detail,
        error=error,
    )
    if include_task:
        event.task.CopyFrom(task)
    return event


def assignment_event(
    kind: KindValue,
    assignment: messages_pb2.Assignment,
    *,
    reason: str = "",
    detail: str = "",
    error: str = "",
    output: bytes = b"",
    worker_id: str = "",
    dispatcher_id: str = "",
    at_ms: int | None = None,
) -> messages_pb2.LifecycleEvent:
    """An event about one attempt: assigned, requeued (with its reason), started, finished, dead."""
    task = assignment.task
    return LifecycleEvent(
        event_id=event_id(task.task_id, assignment.attempt, kind, reason),
        task_id=task.task_id,
        attempt=assignment.attempt,
        kind=kind,
        at_ms=now_ms() if at_ms is None else at_ms,
        tenant=task.tenant,
        action=task.action,
        worker_id=worker_id or assignment.worker_id,
        dispatcher_id=dispatcher_id or assignment.dispatcher_id,
        reason=reason,
        detail=detail,
        error=error,
        output=output,
    )


def result_event(assignment: messages_pb2.Assignment, result: messages_pb2.TaskResult) -> messages_pb2.LifecycleEvent:
    """The terminal event matching a result that was published (completed, failed, dead, ...)."""
    kind = _RESULT_KINDS.get(result.status)
    if kind is None:
        raise ValueError(f"result status {result.status} is not terminal")
    return assignment_event(
        kind,
        assignment,
        error=result.error,
        output=result.output,
        worker_id=result.worker_id,
        at_ms=result.finished_at_ms or None,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch(events: Iterable[bytes]) -> bytes:
    """A LifecycleBatch from serialized events, without parsing them again: each is field 1, length-delimited."""
    parts: list[bytes] = []
    for event in events:
        parts.append(b"\x0a" + _varint(len(event)))
        parts.append(event)
    return b"".join(parts)  # one copy of each event, into the body


class LifecycleEmitter:
    """A bounded buffer of lifecycle events and the loop that publishes it in batches.

    Run `run(exchange)` in the process's task group; call `drain()` before stopping it so that
    what was emitted during shutdown still goes out.
    """

    UNBOUND_PAUSE = 5.0  # seconds events are not built after a batch found no recorder's queue bound

    def __init__(
        self,
        topology: amqp.Topology,
        source: str,
        settings: LifecycleSettings | None = None,
        *,
        confirm_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or LifecycleSettings()
        self._clock = clock
        self._unbound_until = 0.0
        self.unrecorded = 0
        self.routing_key = topology.lifecycle_key(source)
        self.confirm_timeout = confirm_timeout
        self.emitted = self.published = self.dropped = self.batches = self.retries = 0
        self._buffer: deque[bytes] = deque()  # serialized events: a batch is their concatenation
        self._capacity = self.settings.buffer
        self._sending = 0
        self._dropping = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._sending

    @property
    def wanted(self) -> bool:
        """Whether anyone records events: False for a while after a batch found no recorder's queue.

        The recorder's queue is durable and bound once it has run (or `migrate` made it), so events
        wait there while the recorder is down; only a deployment without a task store has none, and
        there building events would be work for nobody. Callers check this before building one.
        """
        return self._unbound_until == 0.0 or self._clock() >= self._unbound_until

    def emit(self, event: messages_pb2.LifecycleEvent) -> None:
        """Buffer one event; never blocks, never raises. A full buffer drops its oldest event."""
        if not self.wanted:
            self.unrecorded += 1
            return
        if len(self._buffer) >= self._capacity:
            self._buffer.popleft()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "lifecycle buffer full (%d events): dropping the oldest until the broker catches up",
                    self._capacity,
                )
        self._buffer.append(event.SerializeToString())
        self.emitted += 1
        if not self._wake.is_set():
            self._wake.set()

    def _take(self) -> list[bytes]:
        """Everything buffered, up to one message's worth (at least one event, however large)."""
        batch: list[bytes] = []
        size = 0
        limit, limit_bytes = self.settings.max_batch, self.settings.max_batch_bytes
        while self._buffer and len(batch) < limit:
            event_size = len(self._buffer[0])
            if batch and size + event_size > limit_bytes:
                break
            batch.append(self._buffer.popleft())
            size += event_size
        return batch

    async def run(self, exchange: AbstractExchange) -> None:
        """Publish batches for as long as the process lives (cancel to stop; drain first)."""
        while True:
            if not self._buffer:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            batch = self._take()
            self._sending = len(batch)
            try:
                kept = await self._publish(exchange, batch)
            finally:
                self._sending = 0
            self.published += len(batch) if kept else 0
            self.batches += 1
            if self._dropping and len(self._buffer) < self._capacity // 2:
                self._dropping = False
                log.info("lifecycle buffer has room again; %d event(s) dropped so far", self.dropped)

    async def _publish(self, exchange: AbstractExchange, batch: list[bytes]) -> bool:
        """Publish until confirmed; False if no queue takes lifecycle events (nobody records them)."""
        body = encode_batch(batch)
        message_id = uuid.uuid4().hex  # the same for every retry of this batch
        delay = 0.05
        while True:
            try:
                await amqp.publish(
                    exchange,
                    self.routing_key,
                    body,
                    mandatory=True,
                    timeout=self.confirm_timeout,
                    message_id=message_id,
                )
                self._unbound_until = 0.0
                return True
            except Unroutable:
                # Nobody records events here (no task store): stop building them for a while.
                self.unrecorded += len(batch)
                if self._unbound_until == 0.0:
                    log.info("no recorder's queue is bound: lifecycle events are not kept")
                self._unbound_until = self._clock() + self.UNBOUND_PAUSE
                return False
            except PublishError as err:
                self.retries += 1
                log.warning("lifecycle events not confirmed (%s); retrying in %.2fs", err, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    async def drain(self, timeout: float) -> bool:
        """Wait until everything emitted so far is published; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                while self._buffer or self._sending:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            log.warning("%d lifecycle event(s) not published before stopping", self.buffered)
            return False
        return True

    def metrics(self) -> Iterable[Metric]:
        """Metric families for the owning role's scrape-time collector."""
        yield labelled_counter(
            "sluicegate_lifecycle_events",
            "Lifecycle events emitted, published to the broker, or dropped from a full buffer.",
            "outcome",
            {
                "emitted": self.emitted,
                "published": self.published,
                "dropped": self.dropped,
                "unrecorded": self.unrecorded,
            },
        )
        yield counter(
            "sluicegate_lifecycle_publish_retries",
            "Lifecycle batches published again after a lost confirm.",
            self.retries,
        )
        yield gauge("sluicegate_lifecycle_buffered", "Lifecycle events waiting to be published.", self.buffered)
