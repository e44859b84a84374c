"""Looking up task records from any process: one task with its history, or a filtered listing."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import asyncpg

from sluicegate.errors import InvalidInput, SchemaBehind, StoreUnavailable, TaskPending
from sluicegate.store import db, schema
from sluicegate.store.records import TaskRecord, TaskState, history_from_rows, record_from_row
from sluicegate.store.settings import StoreSettings
from sluicegate.validation import TASK_ID_PATTERN, check_action, check_tenant

MAX_LIMIT = 10_000
_COLUMNS = (
    "task_id, status, tenant, action, attempts, worker_id, dispatcher_id, reason, detail, output, output_size,"
    " error, submitted_at, first_assigned_at, started_at, finished_at, updated_at, payload_size"
)
LISTED_OUTPUT_BYTES = 200  # listings carry the start of each output, enough to show on a line
_LIST_COLUMNS = _COLUMNS.replace(" output,", f" substring(output from 1 for {LISTED_OUTPUT_BYTES}) AS output,")


def check_task_id(task_id: str) -> None:
    if not TASK_ID_PATTERN.fullmatch(task_id):
        raise InvalidInput("a task id holds 1 to 128 letters, digits or _ . : -")


class TaskStore:
    """Read-only access to the task store; connects on first use, one small pool per instance.

    Every failure of the store raises StoreUnavailable (or SchemaBehind) with a one-line message.
    """

    def __init__(self, settings: StoreSettings) -> None:
        if not settings.configured:
            raise InvalidInput("no task store is configured: set SLUICEGATE_STORE_URL")
        self.settings = settings
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._lock = asyncio.Lock()
        self._answered = False  # the store answered once: it exists, later failures may pass

    async def __aenter__(self) -> TaskStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # closing must not raise: whatever is left is cut off
                pool.terminate()

    async def _ready_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        async with self._lock:
            if self._pool is None:
                pool = await db.create_pool(self.settings, max_size=2)
                try:
                    async with pool.acquire() as connection:
                        await schema.check(connection)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
            return self._pool

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            pool = await self._ready_pool()
            rows = list(await pool.fetch(query, *args))
        except db.STORE_ERRORS as err:
            raise db.translate(err) from err
        self._answered = True
        return rows

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record with its history, or None if the store has no record of it."""
        check_task_id(task_id)
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM sluicegate_tasks WHERE task_id = $1", task_id)
        if not rows:
            return None
        events = await self._fetch(
            "SELECT kind, attempt, at, worker_id, dispatcher_id, reason, detail, error"
            " FROM sluicegate_task_events WHERE task_id = $1",
            task_id,
        )
        return record_from_row(rows[0], history_from_rows(events))

    async def find(
        self,
        *,
        status: TaskState | str | None = None,
        action: str | None = None,
        tenant: str | None = None,
        since: timedelta | None = None,
        limit: int = 100,
    ) -> list[TaskRecord]:
        """Records changed most recently first, filtered as asked: no history, the output's first 200 bytes.

        `since` keeps the tasks whose record changed within that long.
        """
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            try:
                args.append(str(TaskState(status)))
            except ValueError as err:
                choices = ", ".join(s.value for s in TaskState)
                raise InvalidInput(f"status must be one of {choices}") from err
            where.append(f"status = ${len(args)}")
        if action is not None:
            check_action(action)
            args.append(action)
            where.append(f"action = ${len(args)}")
        if tenant is not None:
            check_tenant(tenant)
            args.append(tenant)
            where.append(f"tenant = ${len(args)}")
        if since is not None:
            if since <= timedelta(0):
                raise InvalidInput("since must be longer than zero")
            args.append(since)
            where.append(f"updated_at >= now() - ${len(args)}::interval")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
        args.append(limit)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(
            f"SELECT {_LIST_COLUMNS} FROM sluicegate_tasks {clause} ORDER BY updated_at DESC LIMIT ${len(args)}", *args
        )
        return [record_from_row(row) for row in rows]

    async def status_counts(self, since: timedelta) -> list[tuple[str, int, datetime | None]]:
        """(status, tasks, oldest submission) of the records changed within `since`, for `sluicegate status`."""
        rows = await self._fetch(
            "SELECT status, count(*) AS tasks, min(submitted_at) AS oldest FROM sluicegate_tasks"
            " WHERE updated_at >= now() - $1::interval GROUP BY status ORDER BY status",
            since,
        )
        return [(str(r["status"]), int(r["tasks"]), r["oldest"]) for r in rows]

    async def oldest_waiting(self) -> dict[tuple[str, str], datetime]:
        """Since when the longest-waiting task of each (tenant, action) waits (parked, delayed, backing off)."""
        rows = await self._fetch(
            "SELECT tenant, action, min(status_at) AS since FROM sluicegate_tasks WHERE status = 'waiting'"
            " GROUP BY tenant, action"
        )
        return {(str(r["tenant"]), str(r["action"])): r["since"] for r in rows}

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Poll until the task has a terminal record; TimeoutError after `timeout` seconds.

        Once the store has answered, a failure to reach it is waited out like a record not there yet.
        """
        delay = 0.05
        async with asyncio.timeout(timeout):
            while True:
                try:
                    record = await self.get(task_id)
                except (StoreUnavailable, SchemaBehind):  # a store recreated meanwhile has no schema for a moment
                    if not self._answered:
                        raise
                    record = None
                if record is not None and record.terminal:
                    return record
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 1.0)

    async def result_now(self, task_id: str) -> TaskRecord:
        """The terminal record, or TaskPending if the task has not finished (or has no record yet)."""
        record = await self.get(task_id)
        if record is None or not record.terminal:
            state = record.status if record is not None else "unknown to the task store"
            raise TaskPending(f"task {task_id} is {state}")
        return record
