"""Schedule-to-start timeouts: when a task that has not started must end EXPIRED instead (pure).

A task with `schedule_timeout_ms` and `submitted_at_ms` must start by their sum; "started" means
the dispatcher accepted the worker's receipt of an attempt. One that has not by then never runs.
"""

from __future__ import annotations

from sluicegate.v1 import messages_pb2


def start_deadline_ms(task: messages_pb2.Task) -> int | None:
    """Unix milliseconds by which the task must have started, or None if it may wait for ever."""
    if not task.schedule_timeout_ms or not task.submitted_at_ms:
        return None
    return task.submitted_at_ms + task.schedule_timeout_ms


def is_expired(task: messages_pb2.Task, now_ms: int) -> bool:
    deadline = start_deadline_ms(task)
    return deadline is not None and now_ms > deadline


def expired_error(task: messages_pb2.Task) -> str:
    """What an EXPIRED result says."""
    return f"not started within {task.schedule_timeout_ms} ms of submission"
