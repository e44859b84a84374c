"""Unit tests of cancellation in the scheduler's core: a cancelled task ends wherever it waits, once."""

from __future__ import annotations

from sluicegate import amqp
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.items import Origin
from sluicegate_scheduler.outbox import Entry, Kind

from .test_scheduler_core import assigned, flush, lanes_ready, make_core, submit, task, workers

CANCELLED = messages_pb2.TASK_STATUS_CANCELLED


def results(entries: list[Entry]) -> list[tuple[str, int, str]]:
    return [(e.body.task_id, e.body.status, e.body.error) for e in entries if e.kind == Kind.RESULT]


def test_a_parked_task_cancelled_ends_at_once_and_its_lane_copy_is_dropped_when_read() -> None:
    core, _ = make_core()
    submit(core, [task(1, action="nobody")])
    core.round()
    lanes_ready(core)
    flush(core)  # parked, and the park confirmed
    core.cancel("task-1", "not needed")
    assert results(flush(core)) == [("task-1", CANCELLED, "not needed")]
    assert core.stats.cancelled == 1

    workers(core, ("w1", 1), action="nobody")  # someone serves it now: its lane is read
    (lane,) = core.book
    copy = amqp.Delivery(object(), 1)
    core.take_parked([messages_pb2.Parked(task=task(1, action="nobody"), attempt=1)], copy, Origin.LANE, lane)
    core.round()
    assert assigned(flush(core)) == []
    assert copy in core.to_ack
    assert core.stats.cancelled == 1, "ended once"


def test_a_task_cancelled_while_its_park_is_in_flight_ends_when_the_park_is_confirmed() -> None:
    core, _ = make_core()
    submit(core, [task(1, action="nobody")])
    core.round()
    lanes_ready(core)
    (destination,) = core.outbox.ready()
    batch = core.outbox.take(destination)  # published; its confirm is not here yet
    core.cancel("task-1", "changed my mind")
    assert results(flush(core)) == [], "nothing to end yet: the task is neither held nor parked"
    core.confirmed(*destination, batch)
    core.outbox.sent(destination)
    assert results(flush(core)) == [("task-1", CANCELLED, "changed my mind")]


def test_a_task_cancelled_before_it_arrives_is_ended_on_arrival_and_never_assigned() -> None:
    core, _ = make_core()
    workers(core, ("w1", 2))
    core.cancel("task-1", "too late")
    delivery = submit(core, [task(1), task(2)])
    core.round()
    entries = flush(core)
    assert assigned(entries) == [("task-2", "w1")]
    assert results(entries + flush(core)) == [("task-1", CANCELLED, "too late")]
    assert delivery in core.to_ack


def test_a_delayed_task_cancelled_never_comes_due() -> None:
    core, clock = make_core()
    workers(core, ("w1", 2))
    submit(core, [task(1, run_at_ms=clock.wall() + 5_000)])
    core.round()
    (entry,) = flush(core)
    assert entry.kind == Kind.DELAY
    core.cancel("task-1", "")
    assert results(flush(core)) == [("task-1", CANCELLED, "cancelled")]
    clock.now += 5
    due = amqp.Delivery(object(), 1)
    core.take_parked([entry.body], due, Origin.DUE)
    core.round()
    assert assigned(flush(core)) == []
    assert due in core.to_ack


def test_an_attempt_on_its_way_to_a_dispatcher_is_left_to_it_and_a_requeue_of_it_ends_cancelled() -> None:
    core, _ = make_core()
    workers(core, ("w1", 1))
    submit(core, [task(1)])
    core.round()
    (sent,) = [e for e in flush(core) if e.kind == Kind.ASSIGN]
    core.cancel("task-1", "stop")
    assert results(flush(core)) == [], "the dispatcher holding it ends it"
    back = messages_pb2.Assignment()
    back.CopyFrom(sent.body)
    back.history.append(messages_pb2.Requeue(reason=Reason.WORKER_LOST.value, attempt=1, worker_id="w1"))
    core.take_requeued([back], None, amqp.Delivery(object(), 1))  # it came back before the dispatcher knew
    core.round()
    entries = flush(core)
    assert assigned(entries) == []
    assert results(entries + flush(core)) == [("task-1", CANCELLED, "stop")]


def test_cancelling_twice_or_a_task_nobody_knows_ends_nothing_more() -> None:
    core, _ = make_core()
    core.cancel("task-unknown", "x")
    core.cancel("task-unknown", "x")
    assert flush(core) == []
    assert core.stats.cancelled == 0
