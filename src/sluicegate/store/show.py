"""Task records as people read them: one record with its history, or a table of records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sluicegate.store.records import TaskRecord

_SHOWN_OUTPUT = 2000  # characters of output printed under a record


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d} UTC"


def _after(value: datetime | None, origin: datetime | None) -> str:
    if value is None:
        return "-"
    if origin is None:
        return _when(value)
    return f"{_when(value)} (+{_duration((value - origin).total_seconds())})"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def output_text(output: bytes, limit: int = _SHOWN_OUTPUT) -> str:
    """The output as text when it is UTF-8 (cut at `limit` characters), else its size."""
    try:
        text = output.decode()
    except UnicodeDecodeError:
        return f"<{len(output)} bytes, not text>"
    return text if len(text) <= limit else text[:limit] + "..."


def render(record: TaskRecord) -> str:
    """A record as aligned lines: state, where it ran, timings, output or error, then its history."""
    attempts = f"attempt {record.attempts}" if record.attempts == 1 else f"{record.attempts} attempts"
    lines = [
        f"task       {record.task_id}",
        f"status     {record.status}" + (f" ({attempts})" if record.attempts else ""),
        f"action     {record.action or '-'} (tenant {record.tenant or '-'})",
    ]
    if record.worker_id:
        where = f" (dispatcher {record.dispatcher_id})" if record.dispatcher_id else ""
        lines.append(f"worker     {record.worker_id}{where}")
    if record.reason or record.detail:
        lines.append(f"reason     {': '.join(p for p in (record.reason, record.detail) if p)}")
    origin = record.submitted_at
    lines += [
        f"submitted  {_when(origin)}",
        f"assigned   {_after(record.first_assigned_at, origin)}",
        f"started    {_after(record.started_at, origin)}",
        f"finished   {_after(record.finished_at, origin)}",
    ]
    if record.output_size:
        kept = f", first {len(record.output)} kept" if record.output_truncated else ""
        lines.append(f"output     {output_text(record.output)} ({record.output_size} bytes{kept})")
    if record.error:
        lines.append(f"error      {record.error}")
    if record.history:
        lines.append("history")
        for entry in record.history:
            why = ": ".join(p for p in (entry.reason, entry.detail or entry.error) if p)
            parts = [
                entry.at.strftime("%H:%M:%S.") + f"{entry.at.microsecond // 1000:03d}",
                f"{entry.kind:<10}",
                f"attempt {entry.attempt}" if entry.attempt else "",
                entry.worker_id,
                why,
            ]
            lines.append("  " + "  ".join(p for p in parts if p))
    return "\n".join(lines)


def table(records: Sequence[TaskRecord]) -> str:
    """Records as a table, one line each (no history)."""
    header = ("TASK", "STATUS", "ACTION", "TENANT", "ATTEMPTS", "WORKER", "UPDATED")
    rows = [
        (
            r.task_id,
            str(r.status),
            r.action or "-",
            r.tenant or "-",
            str(r.attempts),
            r.worker_id or "-",
            r.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])
    return "\n".join(lines)
