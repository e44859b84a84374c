"""Writing a batch of lifecycle events in one transaction, idempotently; pruning old records.

The events go in first with ON CONFLICT DO NOTHING; only those that were new are folded into task
rows, so an at-least-once repeat changes nothing. The task rows are upserted with the precedence
rules of fold.py written in SQL. Rows are written in key order, so two recorders sharing the queue
lock rows in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING

from sluicegate.v1 import messages_pb2
from sluicegate_recorder.fold import TaskRow, event_columns, fold

_MS = "to_timestamp({0} / 1000.0)"

_EVENT_COLUMNS = (
    ("task_id", "text"),
    ("event_id", "text"),
    ("attempt", "int"),
    ("kind", "text"),
    ("at_ms", "bigint"),
    ("worker_id", "text"),
    ("dispatcher_id", "text"),
    ("reason", "text"),
    ("detail", "text"),
    ("error", "text"),
)

INSERT_EVENTS = f"""
INSERT INTO sluicegate_task_events
    (task_id, event_id, attempt, kind, at, worker_id, dispatcher_id, reason, detail, error)
SELECT u.task_id, u.event_id, u.attempt, u.kind, {_MS.format("u.at_ms")}, u.worker_id, u.dispatcher_id, u.reason,
       u.detail, u.error
FROM unnest({", ".join(f"${n}::{kind}[]" for n, (_, kind) in enumerate(_EVENT_COLUMNS, 1))})
     AS u({", ".join(name for name, _ in _EVENT_COLUMNS)})
ORDER BY u.task_id, u.event_id
ON CONFLICT DO NOTHING
RETURNING task_id, event_id
"""

# (column in the row, column in the table, SQL type of the parameter array)
_TASK_COLUMNS = (
    ("task_id", "task_id", "text"),
    ("tenant", "tenant", "text"),
    ("action", "action", "text"),
    ("status", "status", "text"),
    ("status_key", "status_key", "bigint"),
    ("status_at_ms", "status_at", "bigint"),
    ("reason", "reason", "text"),
    ("detail", "detail", "text"),
    ("output", "output", "bytea"),
    ("output_size", "output_size", "int"),
    ("error", "error", "text"),
    ("finished_at_ms", "finished_at", "bigint"),
    ("attempts", "attempts", "int"),
    ("worker_id", "worker_id", "text"),
    ("worker_attempt", "worker_attempt", "int"),
    ("dispatcher_id", "dispatcher_id", "text"),
    ("dispatcher_attempt", "dispatcher_attempt", "int"),
    ("submitted_at_ms", "submitted_at", "bigint"),
    ("first_assigned_at_ms", "first_assigned_at", "bigint"),
    ("started_at_ms", "started_at", "bigint"),
    ("started_attempt", "started_attempt", "int"),
    ("spec", "spec", "bytea"),
    ("payload_size", "payload_size", "int"),
)
if [f.name for f in fields(TaskRow)] != [c[0] for c in _TASK_COLUMNS]:
    raise RuntimeError("the upsert must name every TaskRow field, in order")

if TYPE_CHECKING:
    from sluicegate.store.db import Connection


def _pick(condition: str, columns: Sequence[str]) -> list[str]:
    return [f"{c} = CASE WHEN {condition} THEN EXCLUDED.{c} ELSE t.{c} END" for c in columns]


def _newer_by_attempt(name: str) -> str:
    return f"EXCLUDED.{name}_id <> '' AND (t.{name}_id = '' OR EXCLUDED.{name}_attempt > t.{name}_attempt)"


_STARTED_NEWER = (
    "EXCLUDED.started_at IS NOT NULL AND (t.started_at IS NULL OR EXCLUDED.started_attempt > t.started_attempt"
    " OR (EXCLUDED.started_attempt = t.started_attempt AND EXCLUDED.started_at < t.started_at))"
)
_UPDATES = [
    "tenant = CASE WHEN t.tenant = '' THEN EXCLUDED.tenant ELSE t.tenant END",
    "action = CASE WHEN t.action = '' THEN EXCLUDED.action ELSE t.action END",
    *_pick(
        "EXCLUDED.status_key > t.status_key",
        ["status", "status_key", "status_at", "reason", "detail", "output", "output_size", "error", "finished_at"],
    ),
    "attempts = GREATEST(t.attempts, EXCLUDED.attempts)",
    *_pick(_newer_by_attempt("worker"), ["worker_id", "worker_attempt"]),
    *_pick(_newer_by_attempt("dispatcher"), ["dispatcher_id", "dispatcher_attempt"]),
    "submitted_at = LEAST(t.submitted_at, EXCLUDED.submitted_at)",
    "first_assigned_at = LEAST(t.first_assigned_at, EXCLUDED.first_assigned_at)",
    *_pick(_STARTED_NEWER, ["started_at", "started_attempt"]),
    *_pick("t.spec IS NULL", ["spec", "payload_size"]),
    "updated_at = now()",
]
_SELECTED = [_MS.format(f"u.{field}") if field.endswith("_ms") else f"u.{field}" for field, _, _ in _TASK_COLUMNS]

UPSERT_TASKS = f"""
INSERT INTO sluicegate_tasks AS t ({", ".join(column for _, column, _ in _TASK_COLUMNS)}, updated_at)
SELECT {", ".join(_SELECTED)}, now()
FROM unnest({", ".join(f"${n}::{kind}[]" for n, (_, _, kind) in enumerate(_TASK_COLUMNS, 1))})
     AS u({", ".join(field for field, _, _ in _TASK_COLUMNS)})
ON CONFLICT (task_id) DO UPDATE SET
    {", ".join(_UPDATES)}
"""

PRUNE = """
WITH gone AS (
    DELETE FROM sluicegate_tasks
    WHERE task_id IN (
        SELECT task_id FROM sluicegate_tasks WHERE updated_at < now() - $1::interval ORDER BY updated_at LIMIT $2
    )
    RETURNING task_id
), history AS (
    DELETE FROM sluicegate_task_events e USING gone WHERE e.task_id = gone.task_id RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS tasks, (SELECT count(*) FROM history) AS events
"""


@dataclass(frozen=True, slots=True)
class Written:
    """What one transaction did: events new to the store, and repeats it already had."""

    recorded: int
    duplicates: int
    tasks: int


async def write(
    connection: Connection, events: Sequence[messages_pb2.LifecycleEvent], *, now_ms: int, max_output_bytes: int
) -> Written:
    """Record valid `events` in one transaction (call `fold.problem` first to leave out bad ones)."""
    unique: dict[tuple[str, str], messages_pb2.LifecycleEvent] = {}
    for event in events:
        unique.setdefault((event.task_id, event.event_id), event)
    keys = sorted(unique)
    ordered = [unique[key] for key in keys]
    async with connection.transaction():
        rows = await connection.fetch(INSERT_EVENTS, *event_columns(ordered, now_ms))
        inserted = {(r["task_id"], r["event_id"]) for r in rows}
        fresh = [unique[key] for key in keys if key in inserted]
        tasks = fold(fresh, now_ms, max_output_bytes)
        if tasks:
            task_columns = [[getattr(row, field) for row in tasks] for field, _, _ in _TASK_COLUMNS]
            await connection.execute(UPSERT_TASKS, *task_columns)
    return Written(recorded=len(fresh), duplicates=len(events) - len(fresh), tasks=len(tasks))


async def prune(connection: Connection, older_than: timedelta, *, chunk: int = 5000) -> tuple[int, int]:
    """Delete records unchanged for `older_than`, with their history, a chunk per transaction."""
    tasks = events = 0
    while True:
        row = await connection.fetchrow(PRUNE, older_than, chunk)
        assert row is not None
        tasks += row["tasks"]
        events += row["events"]
        if row["tasks"] < chunk:
            return tasks, events
