"""Logging set-up: plain lines for people, one JSON object per line when asked."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from opentelemetry import trace

from sluicegate.settings import LogSettings

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given to the logger (task_id, trace_id) are kept."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TraceContext(logging.Filter):
    """Adds the current trace and span ids to every record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_id = format(context.trace_id, "032x")
                record.span_id = format(context.span_id, "016x")
        elif isinstance(record.trace_id, int):
            record.trace_id = format(record.trace_id, "032x")
        return True


def configure(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContext())
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # aio-pika and aiormq are chatty at INFO about reconnects we already report ourselves.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
