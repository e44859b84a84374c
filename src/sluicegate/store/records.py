"""A task's record as the store keeps it: its state, the precedence between states, and its history.

Pure: no database here. The recorder folds lifecycle events into records with `status_key`, and
readers turn rows into `TaskRecord`s.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sluicegate.v1 import messages_pb2

if TYPE_CHECKING:
    import asyncpg

    Row = Mapping[str, Any] | asyncpg.Record

K = messages_pb2.LifecycleEvent


class TaskState(StrEnum):
    """Where a task stands, from its lifecycle events."""

    SUBMITTED = "submitted"  # the scheduler took it in
    WAITING = "waiting"  # parked, delayed or backing off
    ASSIGNED = "assigned"  # an attempt went to a worker's dispatcher
    RUNNING = "running"  # the worker acknowledged the attempt: its handler runs
    REQUEUED = "requeued"  # the attempt came back; another follows
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DEAD = "dead"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        TaskState.COMPLETED,
        TaskState.FAILED,
        TaskState.EXPIRED,
        TaskState.CANCELLED,
        TaskState.DEAD,
        TaskState.REJECTED,
    }
)

STATE_OF_KIND: dict[int, TaskState] = {
    K.KIND_SUBMITTED: TaskState.SUBMITTED,
    K.KIND_WAITING: TaskState.WAITING,
    K.KIND_ASSIGNED: TaskState.ASSIGNED,
    K.KIND_STARTED: TaskState.RUNNING,
    K.KIND_REQUEUED: TaskState.REQUEUED,
    K.KIND_COMPLETED: TaskState.COMPLETED,
    K.KIND_FAILED: TaskState.FAILED,
    K.KIND_EXPIRED: TaskState.EXPIRED,
    K.KIND_CANCELLED: TaskState.CANCELLED,
    K.KIND_DEAD: TaskState.DEAD,
    K.KIND_REJECTED: TaskState.REJECTED,
    # An operator replayed it: on the dead task, a history entry only (a terminal state is final); on
    # the task replaying it, the ground state until its own submitted event comes.
    K.KIND_REPLAYED: TaskState.SUBMITTED,
}

RESULT_STATUS: dict[TaskState, messages_pb2.TaskStatus.ValueType] = {
    TaskState.COMPLETED: messages_pb2.TASK_STATUS_COMPLETED,
    TaskState.FAILED: messages_pb2.TASK_STATUS_FAILED,
    TaskState.EXPIRED: messages_pb2.TASK_STATUS_EXPIRED,
    TaskState.CANCELLED: messages_pb2.TASK_STATUS_CANCELLED,
    TaskState.DEAD: messages_pb2.TASK_STATUS_DEAD,
    TaskState.REJECTED: messages_pb2.TASK_STATUS_REJECTED,
}

# Within one attempt: assigned, then started, then requeued, then waiting for the next attempt.
# An event's attempt is the latest attempt made so far (0 before the first assignment), so a
# task waiting after attempt n was requeued outranks attempt n, and attempt n+1 outranks both.
_RANKS: dict[int, int] = {
    K.KIND_REPLAYED: 0,
    K.KIND_SUBMITTED: 1,
    K.KIND_ASSIGNED: 2,
    K.KIND_STARTED: 3,
    K.KIND_REQUEUED: 4,
    K.KIND_WAITING: 5,
}
_TERMINAL_RANKS: dict[int, int] = {
    K.KIND_COMPLETED: 1,
    K.KIND_FAILED: 2,
    K.KIND_EXPIRED: 3,
    K.KIND_CANCELLED: 4,
    K.KIND_DEAD: 5,
    K.KIND_REJECTED: 6,
}
_AT_LIMIT = 1 << 42  # milliseconds: past the year 2100
_TERMINAL_BASE = 1 << 62
MAX_ATTEMPT = 0xFFFF
# How history entries of the same millisecond and attempt are listed.
_LISTED_IN_ORDER = (
    ("submitted", "waiting", "assigned", "started", "requeued"),
    ("completed", "failed", "expired", "cancelled", "dead", "rejected"),
    ("replayed",),
)
_LISTING = {name: n for n, name in enumerate(name for group in _LISTED_IN_ORDER for name in group)}


def status_key(kind: int, attempt: int, at_ms: int) -> int:
    """The precedence of the state an event puts a task in; the highest key decides the status.

    Any terminal state outranks every other, and the earliest terminal one wins (a terminal state
    is final). Otherwise a later attempt outranks an earlier one, then the rank within the
    attempt, then the later event. One bigint, so PostgreSQL compares it as cheaply as Python.
    """
    at = min(max(at_ms, 0), _AT_LIMIT - 1)
    terminal = _TERMINAL_RANKS.get(kind)
    if terminal is not None:
        return _TERMINAL_BASE + (_AT_LIMIT - 1 - at) * 16 + terminal
    return (min(max(attempt, 0), MAX_ATTEMPT) << 46) | (_RANKS[kind] << 42) | at


def is_known_kind(kind: int) -> bool:
    return kind in _RANKS or kind in _TERMINAL_RANKS


def is_terminal_kind(kind: int) -> bool:
    return kind in _TERMINAL_RANKS


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One lifecycle event of a task: what happened, to which attempt, where and why."""

    kind: str  # submitted, waiting, assigned, started, requeued, completed, failed, expired, ...
    attempt: int
    at: datetime
    worker_id: str = ""
    dispatcher_id: str = ""
    reason: str = ""
    detail: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
            "worker_id": self.worker_id,
            "dispatcher_id": self.dispatcher_id,
            "reason": self.reason,
            "detail": self.detail,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What the task store knows of one task.

    `status` is decided by precedence, whatever order the events arrived in. `output` is kept up
    to the recorder's limit (`output_size` is the full size). Timings are UTC; `started_at` is when
    the latest attempt that started did so. `history` is empty in listings (`TaskStore.find`).
    """

    task_id: str
    status: TaskState
    tenant: str
    action: str
    attempts: int
    worker_id: str
    dispatcher_id: str
    reason: str
    detail: str
    output: bytes
    output_size: int
    error: str
    submitted_at: datetime | None
    first_assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    payload_size: int | None = None
    history: tuple[HistoryEntry, ...] = field(default=())

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def output_truncated(self) -> bool:
        return len(self.output) < self.output_size

    def to_result(self) -> messages_pb2.TaskResult:
        """The record as the TaskResult a client would have received (for a terminal record)."""
        if not self.terminal:
            raise ValueError(f"task {self.task_id} is {self.status}, not finished")
        return messages_pb2.TaskResult(
            task_id=self.task_id,
            status=RESULT_STATUS[self.status],
            output=self.output,
            error=self.error,
            attempt=self.attempts,
            worker_id=self.worker_id,
            submitted_at_ms=_ms(self.submitted_at),
            finished_at_ms=_ms(self.finished_at),
            history=[
                messages_pb2.Requeue(
                    reason=h.reason, detail=h.detail, worker_id=h.worker_id, attempt=h.attempt, at_ms=_ms(h.at)
                )
                for h in self.history
                if h.kind == "requeued"
            ],
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; output is text when it is UTF-8, else base64 under `output_base64`."""
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "status": str(self.status),
            "tenant": self.tenant,
            "action": self.action,
            "attempts": self.attempts,
            "worker_id": self.worker_id,
            "dispatcher_id": self.dispatcher_id,
            "reason": self.reason,
            "detail": self.detail,
            "error": self.error,
            "output_size": self.output_size,
            "output_truncated": self.output_truncated,
            "payload_size": self.payload_size,
        }
        try:
            data["output"] = self.output.decode()
        except UnicodeDecodeError:
            data["output_base64"] = base64.b64encode(self.output).decode()
        for name in ("submitted_at", "first_assigned_at", "started_at", "finished_at", "updated_at"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value is not None else None
        data["history"] = [h.to_json() for h in self.history]
        return data


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def record_from_row(row: Row, history: tuple[HistoryEntry, ...] = ()) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        status=TaskState(row["status"]),
        tenant=row["tenant"],
        action=row["action"],
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        dispatcher_id=row["dispatcher_id"],
        reason=row["reason"],
        detail=row["detail"],
        output=bytes(row["output"] or b""),
        output_size=row["output_size"],
        error=row["error"],
        submitted_at=row["submitted_at"],
        first_assigned_at=row["first_assigned_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        payload_size=row["payload_size"],
        history=history,
    )


def history_from_rows(rows: Iterable[Row]) -> tuple[HistoryEntry, ...]:
    entries = [
        HistoryEntry(
            kind=row["kind"],
            attempt=row["attempt"],
            at=row["at"],
            worker_id=row["worker_id"],
            dispatcher_id=row["dispatcher_id"],
            reason=row["reason"],
            detail=row["detail"],
            error=row["error"],
        )
        for row in rows
    ]
    entries.sort(key=lambda h: (h.at, h.attempt, _LISTING.get(h.kind, len(_LISTING))))
    return tuple(entries)
