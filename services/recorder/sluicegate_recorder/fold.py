"""Folding lifecycle events into task rows: pure, order-independent, with the rules the upsert uses.

Each event becomes a partial row; `merge` combines two rows of one task so that the result does not
depend on the order (or grouping) of the events: the status comes from the event with the highest
`status_key`, the worker from the latest attempt that names one, timings are the earliest (or, for
`started_at`, the latest attempt's). writer.py applies exactly the same rules between a stored row
and a batch's row in SQL, so a task's record is the same whatever order its events arrive in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    if not event.event_id or len(event.event_id) > MAX_EVENT_ID or "\x00" in event.event_id:
        return "event id"
    if not is_known_kind(event.kind):
        return "kind"
    return None


def _at(event: messages_pb2.LifecycleEvent, now_ms: int) -> int:
    return min(event.at_ms, _LAST_MS) if event.at_ms > 0 else now_ms


def event_columns(events: Sequence[messages_pb2.LifecycleEvent], now_ms: int) -> list[list[Any]]:
    """The columns of sluicegate_task_events for `events`, one list per column (see writer.py)."""
    columns: list[list[Any]] = [[] for _ in range(10)]
    task_ids, event_ids, attempts, kinds, ats, workers, dispatchers, reasons, details, errors = columns
    for event in events:
        task_ids.append(event.task_id)
        event_ids.append(event.event_id)
        attempts.append(min(event.attempt, MAX_ATTEMPT))
        kinds.append(KIND_NAMES[event.kind])
        ats.append(_at(event, now_ms))
        workers.append(clean(event.worker_id, MAX_DETAIL))
        dispatchers.append(clean(event.dispatcher_id, MAX_DETAIL))
        reasons.append(clean(event.reason, MAX_DETAIL))
        details.append(clean(event.detail, MAX_DETAIL))
        errors.append(clean(event.error, MAX_DETAIL))
    return columns


@dataclass(slots=True)
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


def absorb(a: TaskRow, b: TaskRow) -> None:
    """Fold `b` into `a` in place: `a` becomes the row both rows' events make together."""
    if b.status_key > a.status_key:
        a.status, a.status_key, a.status_at_ms = b.status, b.status_key, b.status_at_ms
        a.reason, a.detail, a.error = b.reason, b.detail, b.error
        a.output, a.output_size, a.finished_at_ms = b.output, b.output_size, b.finished_at_ms
    if not a.tenant:
        a.tenant = b.tenant
    if not a.action:
        a.action = b.action
    if b.attempts > a.attempts:
        a.attempts = b.attempts
    if b.worker_id and (not a.worker_id or b.worker_attempt > a.worker_attempt):
        a.worker_id, a.worker_attempt = b.worker_id, b.worker_attempt
    if b.dispatcher_id and (not a.dispatcher_id or b.dispatcher_attempt > a.dispatcher_attempt):
        a.dispatcher_id, a.dispatcher_attempt = b.dispatcher_id, b.dispatcher_attempt
    a.submitted_at_ms = _earliest(a.submitted_at_ms, b.submitted_at_ms)
    a.first_assigned_at_ms = _earliest(a.first_assigned_at_ms, b.first_assigned_at_ms)
    if b.started_at_ms is not None and (
        a.started_at_ms is None
        or b.started_attempt > a.started_attempt
        or (b.started_attempt == a.started_attempt and b.started_at_ms < a.started_at_ms)
    ):
        a.started_at_ms, a.started_attempt = b.started_at_ms, b.started_attempt
    if a.spec is None:
        a.spec, a.payload_size = b.spec, b.payload_size


def merge(a: TaskRow, b: TaskRow) -> TaskRow:
    """The row both rows' events make together; the same whichever is `a` (for consistent events)."""
    merged = copy.copy(a)
    absorb(merged, b)
    return merged


def fold(events: Iterable[messages_pb2.LifecycleEvent], now_ms: int, max_output_bytes: int) -> list[TaskRow]:
    """One row per task of `events` (valid ones only), sorted by task id (the order rows are locked in)."""
    rows: dict[str, TaskRow] = {}
    for event in events:
        row = task_row(event, now_ms, max_output_bytes)
        known = rows.get(event.task_id)
        if known is None:
            rows[event.task_id] = row
        else:
            absorb(known, row)
    return [rows[task_id] for task_id in sorted(rows)]
