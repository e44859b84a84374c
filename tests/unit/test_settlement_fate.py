"""Unit tests of what a terminal report means (retry, finish, or retries exhausted) and of start deadlines."""

from __future__ import annotations

import pytest

from sluicegate.expiry import expired_error, is_expired, start_deadline_ms
from sluicegate.retry import RetryPolicy
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate_dispatcher.reports import Fate, fate_of

pytestmark = pytest.mark.timeout(5)

Event = worker_pb2.TaskEvent


def failed(*, retryable: bool) -> worker_pb2.TaskEvent:
    return Event(task_id="t", attempt=1, kind=Event.KIND_FAILED, error="boom", retryable=retryable)


COMPLETED = Event(task_id="t", attempt=1, kind=Event.KIND_COMPLETED)


@pytest.mark.parametrize(
    ("event", "run_failures", "max_retries", "fate"),
    [
        (COMPLETED, 0, 3, Fate.FINISH),
        (failed(retryable=True), 0, 3, Fate.RETRY),
        (failed(retryable=True), 2, 3, Fate.RETRY),
        (failed(retryable=True), 3, 3, Fate.EXHAUSTED),
        (failed(retryable=True), 0, 0, Fate.EXHAUSTED),
        # A PermanentError is never retried, however many retries are left, and is not "exhausted".
        (failed(retryable=False), 0, 100, Fate.FINISH),
        (failed(retryable=False), 5, 0, Fate.FINISH),
    ],
)
def test_fate_of_a_terminal_report(
    event: worker_pb2.TaskEvent, run_failures: int, max_retries: int, fate: Fate
) -> None:
    assert fate_of(event, run_failures, RetryPolicy(max_retries=max_retries)) is fate


# Start deadlines.


def test_a_task_without_a_schedule_timeout_never_expires() -> None:
    assert start_deadline_ms(messages_pb2.Task(submitted_at_ms=1000)) is None
    assert start_deadline_ms(messages_pb2.Task(schedule_timeout_ms=500)) is None, "no submission time: no deadline"
    assert not is_expired(messages_pb2.Task(submitted_at_ms=1000), 10**13)


def test_a_task_expires_once_its_schedule_timeout_has_passed() -> None:
    task = messages_pb2.Task(submitted_at_ms=10_000, schedule_timeout_ms=1500)
    assert start_deadline_ms(task) == 11_500
    assert not is_expired(task, 11_000)
    assert not is_expired(task, 11_500), "starting exactly at the deadline is within it"
    assert is_expired(task, 11_501)
    assert expired_error(task) == "not started within 1500 ms of submission"
