"""Folding lifecycle events into task rows: precedence, order independence, limits, what is refused."""

from __future__ import annotations

import itertools
import random

import pytest

from sluicegate.lifecycle import K, assignment_event, task_event
from sluicegate.store.records import TaskState, status_key
from sluicegate.v1 import messages_pb2
from sluicegate_recorder.fold import TaskRow, fold, merge, problem, task_row

pytestmark = pytest.mark.timeout(20)

NOW = 10_000_000
TASK = messages_pb2.Task(task_id="t1", tenant="acme", action="echo", payload=b"0123456789", submitted_at_ms=1000)


def _attempt(n: int, worker: str) -> messages_pb2.Assignment:
    return messages_pb2.Assignment(task=TASK, attempt=n, worker_id=worker, dispatcher_id=f"d-{worker}")


def _story() -> list[messages_pb2.LifecycleEvent]:
    """Submitted, parked, attempt 1 on w1 times out, waits, attempt 2 on w2 completes."""
    a1, a2 = _attempt(1, "w1"), _attempt(2, "w2")
    return [
        task_event(K.KIND_SUBMITTED, TASK, include_task=True, at_ms=1001),
        task_event(K.KIND_WAITING, TASK, reason="no_worker", at_ms=1002),
        assignment_event(K.KIND_ASSIGNED, a1, at_ms=1003),
        assignment_event(K.KIND_STARTED, a1, at_ms=1004),
        assignment_event(K.KIND_REQUEUED, a1, reason="worker_lost", detail="stopped heartbeating", at_ms=1005),
        task_event(K.KIND_WAITING, TASK, attempt=1, reason="backoff", at_ms=1006),
        assignment_event(K.KIND_ASSIGNED, a2, at_ms=1007),
        assignment_event(K.KIND_STARTED, a2, at_ms=1008),
        assignment_event(K.KIND_COMPLETED, a2, output=b"done!", at_ms=1009),
    ]


def _only(rows: list[TaskRow]) -> TaskRow:
    (row,) = rows
    return row


def test_the_whole_story_ends_completed_with_every_timing() -> None:
    row = _only(fold(_story(), NOW, 1024))
    assert row.status == TaskState.COMPLETED
    assert (row.attempts, row.worker_id, row.dispatcher_id) == (2, "w2", "d-w2")
    assert row.output == b"done!"
    assert row.output_size == 5
    assert row.submitted_at_ms == 1000, "the client's submit time, from the task"
    assert row.first_assigned_at_ms == 1003
    assert (row.started_at_ms, row.started_attempt) == (1008, 2), "the latest attempt's start"
    assert row.finished_at_ms == 1009
    assert row.payload_size == 10
    spec = messages_pb2.Task.FromString(row.spec or b"")
    assert spec.action == "echo"
    assert spec.payload == b"", "the payload is not kept"


@pytest.mark.parametrize("seed", range(30))
def test_any_order_and_any_grouping_give_the_same_row(seed: int) -> None:
    rng = random.Random(seed)
    events = _story()
    expected = _only(fold(events, NOW, 1024))
    rng.shuffle(events)
    cut = sorted(rng.sample(range(1, len(events)), 3))
    groups = [events[i:j] for i, j in itertools.pairwise([0, *cut, len(events)])]
    rows = [_only(fold(group, NOW, 1024)) for group in groups]
    rng.shuffle(rows)
    combined = rows[0]
    for row in rows[1:]:
        combined = merge(combined, row) if rng.random() < 0.5 else merge(row, combined)
    assert combined == expected


def test_each_prefix_of_the_story_shows_where_the_task_stands() -> None:
    expected = [
        TaskState.SUBMITTED,
        TaskState.WAITING,
        TaskState.ASSIGNED,
        TaskState.RUNNING,
        TaskState.REQUEUED,
        TaskState.WAITING,
        TaskState.ASSIGNED,
        TaskState.RUNNING,
        TaskState.COMPLETED,
    ]
    events = _story()
    for n, state in enumerate(expected, 1):
        shuffled = events[:n]
        random.Random(n).shuffle(shuffled)
        assert _only(fold(shuffled, NOW, 1024)).status == state, n


def test_a_terminal_state_is_final() -> None:
    a1, a2 = _attempt(1, "w1"), _attempt(2, "w2")
    dead = assignment_event(K.KIND_DEAD, a1, reason="ack_timeout", error="gave up", at_ms=2000)
    late = [
        assignment_event(K.KIND_STARTED, a2, at_ms=3000),
        assignment_event(K.KIND_REQUEUED, a2, reason="lock_timeout", at_ms=3001),
        task_event(K.KIND_WAITING, TASK, attempt=5, reason="backoff", at_ms=3002),
    ]
    row = _only(fold([dead, *late], NOW, 1024))
    assert row.status == TaskState.DEAD
    assert (row.reason, row.error, row.finished_at_ms) == ("ack_timeout", "gave up", 2000)
    assert row.attempts == 5, "attempts still counts what was seen"


def test_the_first_terminal_state_wins_between_two() -> None:
    a1 = _attempt(1, "w1")
    completed = assignment_event(K.KIND_COMPLETED, a1, output=b"ok", at_ms=2000)
    cancelled = task_event(K.KIND_CANCELLED, TASK, attempt=1, at_ms=2500)
    for events in ([completed, cancelled], [cancelled, completed]):
        assert _only(fold(events, NOW, 1024)).status == TaskState.COMPLETED


def test_a_later_attempt_supersedes_an_earlier_one() -> None:
    a1, a2 = _attempt(1, "w1"), _attempt(2, "w2")
    events = [assignment_event(K.KIND_ASSIGNED, a2, at_ms=1000), assignment_event(K.KIND_STARTED, a1, at_ms=5000)]
    row = _only(fold(events, NOW, 1024))
    assert row.status == TaskState.ASSIGNED, "attempt 2's assignment outranks attempt 1's late start"
    assert row.worker_id == "w2"
    assert (row.started_at_ms, row.started_attempt) == (5000, 1)


def test_status_key_orders_states() -> None:
    keys = [
        status_key(K.KIND_SUBMITTED, 0, 5),
        status_key(K.KIND_WAITING, 0, 1),
        status_key(K.KIND_ASSIGNED, 1, 1),
        status_key(K.KIND_STARTED, 1, 1),
        status_key(K.KIND_REQUEUED, 1, 1),
        status_key(K.KIND_WAITING, 1, 1),
        status_key(K.KIND_ASSIGNED, 2, 0),
        status_key(K.KIND_COMPLETED, 1, 9_000_000_000_000),
        status_key(K.KIND_DEAD, 1, 5),
    ]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert all(0 < key < 2**63 for key in keys), "fits a PostgreSQL bigint"
    assert status_key(K.KIND_ASSIGNED, 10**9, 2**50) < 2**62, "attempts and times are clamped"


def test_output_and_error_are_cut_at_the_limit_and_their_size_kept() -> None:
    event = assignment_event(K.KIND_COMPLETED, _attempt(1, "w"), output=b"x" * 100, error="e" * 100, at_ms=5)
    row = task_row(event, NOW, 10)
    assert (row.output, row.output_size, row.error) == (b"x" * 10, 100, "e" * 10)
    started = task_row(assignment_event(K.KIND_STARTED, _attempt(1, "w"), output=b"ignored"), NOW, 10)
    assert (started.output, started.output_size) == (None, 0), "only a finished task has output"


def test_text_postgresql_cannot_hold_is_cleaned() -> None:
    event = assignment_event(K.KIND_FAILED, _attempt(1, "w\x00x"), error="bad\x00error", reason="r\x00")
    row = task_row(event, NOW, 1024)
    assert (row.error, row.worker_id, row.reason) == ("baderror", "wx", "r")


def test_missing_time_is_the_recording_time() -> None:
    event = assignment_event(K.KIND_STARTED, _attempt(1, "w"), at_ms=0)
    event.at_ms = 0
    assert task_row(event, NOW, 1024).started_at_ms == NOW


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"task_id": ""}, "task id"),
        ({"task_id": "has space"}, "task id"),
        ({"task_id": "x" * 200}, "task id"),
        ({"event_id": ""}, "event id"),
        ({"event_id": "e" * 600}, "event id"),
        ({"kind": 0}, "kind"),
        ({"kind": 77}, "kind"),
    ],
)
def test_events_that_cannot_be_recorded_say_why(change: dict[str, object], why: str) -> None:
    event = assignment_event(K.KIND_STARTED, _attempt(1, "w"))
    assert problem(event) is None
    for field, value in change.items():
        setattr(event, field, value)
    assert problem(event) == why
