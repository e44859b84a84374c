"""Folding lifecycle events into task rows: pure, order-independent, with the rules the upsert uses.

Each event becomes a partial row; `merge` combines two rows of one task so that the result does not
depend on the order (or grouping) of the events: the status comes from the event with the highest
`status_key`, the worker from the latest attempt that names one, timings are the earliest (or, for
`started_at`, the latest attempt's). writer.py applies exactly the same rules between a stored row
and a batch's row in SQL, so a task's record is the same whatever order its events arrive in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from sluicegate.lifecycle import KIND_NAMES
from sluicegate.store.records import (
    MAX_ATTEMPT,
    STATE_OF_KIND,
    is_known_kind,
    is_terminal_kind,
    status_key,
)
from sluicegate.v1 import messages_pb2
from sluicegate.validation import TASK_ID_PATTERN

K = messages_pb2.LifecycleEvent
MAX_EVENT_ID = 512
MAX_DETAIL = 1000  # reason, detail and an event's error, in the history
_LAST_MS = (1 << 42) - 1


def clean(text: str, limit: int) -> str:
    """Text PostgreSQL accepts (no NUL characters), at most `limit` characters."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text[:limit]


def problem(event: messages_pb2.LifecycleEvent) -> str | None:
    """Why an event cannot be recorded, or None if it can."""
    if not TASK_ID_PATTERN.fullmatch(event.task_id):
        return "task id"
    if not event.event_id or len(event.event_id) > MAX_EVENT_ID:
        return "event id"
    if not is_known_kind(event.kind):
        return "kind"
    return None


def _at(event: messages_pb2.LifecycleEvent, now_ms: int) -> int:
    return min(event.at_ms, _LAST_MS) if event.at_ms > 0 else now_ms


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of sluicegate_task_events."""

    task_id: str
    event_id: str
    attempt: int
    kind: str
    at_ms: int
    worker_id: str
    dispatcher_id: str
    reason: str
    detail: str
    error: str


def event_row(event: messages_pb2.LifecycleEvent, now_ms: int) -> EventRow:
    return EventRow(
        task_id=event.task_id,
        event_id=clean(event.event_id, MAX_EVENT_ID),
        attempt=min(event.attempt, MAX_ATTEMPT),
        kind=KIND_NAMES[event.kind],
        at_ms=_at(event, now_ms),
        worker_id=clean(event.worker_id, MAX_DETAIL),
        dispatcher_id=clean(event.dispatcher_id, MAX_DETAIL),
        reason=clean(event.reason, MAX_DETAIL),
        detail=clean(event.detail, MAX_DETAIL),
        error=clean(event.error, MAX_DETAIL),
    )


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One task's row of sluicegate_tasks, as far as some of its events tell (times in unix ms)."""

    task_id: str
    tenant: str
    action: str
    # The status group: all from the event with the highest status_key.
    status: str
    status_key: int
    status_at_ms: int
    reason: str
    detail: str
    output: bytes | None
    output_size: int
    error: str
    finished_at_ms: int | None
    # The rest, each by its own rule.
    attempts: int
    worker_id: str
    worker_attempt: int
    dispatcher_id: str
    dispatcher_attempt: int
    submitted_at_ms: int | None
    first_assigned_at_ms: int | None
    started_at_ms: int | None
    started_attempt: int
    spec: bytes | None
    payload_size: int | None


def task_row(event: messages_pb2.LifecycleEvent, now_ms: int, max_output_bytes: int) -> TaskRow:
    kind = event.kind
    at = _at(event, now_ms)
    attempt = min(event.attempt, MAX_ATTEMPT)
    terminal = is_terminal_kind(kind)
    submitted_at: int | None = None
    spec: bytes | None = None
    payload_size: int | None = None
    if kind == K.KIND_SUBMITTED:
        submitted_at = at
        if event.HasField("task"):
            task = messages_pb2.Task()
            task.CopyFrom(event.task)
            payload_size = len(task.payload)
            task.ClearField("payload")  # the payload is the producer's, and can be large
            spec = task.SerializeToString()
            if 0 < task.submitted_at_ms <= _LAST_MS:
                submitted_at = task.submitted_at_ms
    return TaskRow(
        task_id=event.task_id,
        tenant=clean(event.tenant, 64),
        action=clean(event.action, 128),
        status=STATE_OF_KIND[kind].value,
        status_key=status_key(kind, attempt, at),
        status_at_ms=at,
        reason=clean(event.reason, MAX_DETAIL),
        detail=clean(event.detail, MAX_DETAIL),
        output=event.output[:max_output_bytes] if terminal and event.output else None,
        output_size=len(event.output) if terminal else 0,
        error=clean(event.error, max_output_bytes),
        finished_at_ms=at if terminal else None,
        attempts=attempt,
        worker_id=clean(event.worker_id, MAX_DETAIL),
        worker_attempt=attempt,
        dispatcher_id=clean(event.dispatcher_id, MAX_DETAIL),
        dispatcher_attempt=attempt,
        submitted_at_ms=submitted_at,
        first_assigned_at_ms=at if kind == K.KIND_ASSIGNED else None,
        started_at_ms=at if kind == K.KIND_STARTED else None,
        started_attempt=attempt if kind == K.KIND_STARTED else 0,
        spec=spec,
        payload_size=payload_size,
    )


def _earliest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def merge(a: TaskRow, b: TaskRow) -> TaskRow:
    """The row both rows' events make together; the same whichever is `a` (for consistent events)."""
    status = b if b.status_key > a.status_key else a
    worker = b if b.worker_id and (not a.worker_id or b.worker_attempt > a.worker_attempt) else a
    dispatcher = b if b.dispatcher_id and (not a.dispatcher_id or b.dispatcher_attempt > a.dispatcher_attempt) else a
    started = a
    if b.started_at_ms is not None and (
        a.started_at_ms is None
        or b.started_attempt > a.started_attempt
        or (b.started_attempt == a.started_attempt and b.started_at_ms < a.started_at_ms)
    ):
        started = b
    spec = a if a.spec is not None else b
    return replace(
        status,
        tenant=a.tenant or b.tenant,
        action=a.action or b.action,
        attempts=max(a.attempts, b.attempts),
        worker_id=worker.worker_id,
        worker_attempt=worker.worker_attempt,
        dispatcher_id=dispatcher.dispatcher_id,
        dispatcher_attempt=dispatcher.dispatcher_attempt,
        submitted_at_ms=_earliest(a.submitted_at_ms, b.submitted_at_ms),
        first_assigned_at_ms=_earliest(a.first_assigned_at_ms, b.first_assigned_at_ms),
        started_at_ms=started.started_at_ms,
        started_attempt=started.started_attempt,
        spec=spec.spec,
        payload_size=spec.payload_size,
    )


def fold(events: Iterable[messages_pb2.LifecycleEvent], now_ms: int, max_output_bytes: int) -> list[TaskRow]:
    """One row per task of `events` (valid ones only), sorted by task id (the order rows are locked in)."""
    rows: dict[str, TaskRow] = {}
    for event in events:
        row = task_row(event, now_ms, max_output_bytes)
        known = rows.get(event.task_id)
        rows[event.task_id] = row if known is None else merge(known, row)
    return [rows[task_id] for task_id in sorted(rows)]
