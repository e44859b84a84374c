"""Structured logs: one JSON object per line, with the task id given and the current trace id."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from sluicegate.logs import JsonFormatter, TraceContext


def _logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContext())
    logger = logging.getLogger(f"test-logs-{id(out)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_a_line_about_a_task_carries_its_task_id_and_trace_id() -> None:
    logger, out = _logger()
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("dispatch") as span:
        logger.info("requeued task %s", "t-1", extra={"task_id": "t-1", "reason": "lock_timeout"})
    line = json.loads(out.getvalue())
    assert line["message"] == "requeued task t-1"
    assert line["task_id"] == "t-1"
    assert line["reason"] == "lock_timeout"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["level"] == "INFO"


def test_a_line_outside_any_span_has_no_trace_id_and_an_integer_trace_id_is_rendered_hex() -> None:
    logger, out = _logger()
    logger.warning("plain")
    logger.warning("dead", extra={"task_id": "t-2", "trace_id": 255})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in first
    assert second["trace_id"] == f"{255:032x}"
