"""Unit tests of what the dispatcher's Sessions keep for run deadlines and cancellations."""

from __future__ import annotations

import pytest

from sluicegate_dispatcher.sessions import Sessions

from .test_sessions_core import streaming, take

pytestmark = pytest.mark.timeout(5)


def test_a_run_past_its_deadline_is_overdue_once() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t1")
    sessions.started(lease, 10.0)
    assert sessions.overdue_runs(9.9) == []
    assert sessions.overdue_runs(10.0) == [lease]
    assert sessions.overdue_runs(20.0) == [], "reported once"


def test_an_extension_moves_the_deadline_later_never_earlier() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t1")
    sessions.started(lease, 10.0)
    sessions.extend(lease, 30.0, now=5.0)
    assert lease.run_deadline == 35.0
    assert sessions.overdue_runs(11.0) == [], "the old deadline no longer counts"
    sessions.extend(lease, 1.0, now=6.0)  # asks for less than it has
    assert lease.run_deadline == 35.0
    assert sessions.overdue_runs(35.0) == [lease]


def test_a_run_without_a_timeout_is_never_overdue_and_is_not_given_one_by_an_extension() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t1")
    sessions.started(lease, float("inf"))
    sessions.extend(lease, 5.0, now=1.0)
    assert lease.run_deadline == float("inf")
    assert sessions.overdue_runs(1e9) == []


def test_a_lease_settled_before_its_deadline_is_not_overdue() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t1")
    sessions.started(lease, 10.0)
    sessions.settle(lease.key, finished=True)
    assert sessions.overdue_runs(11.0) == []


def test_a_cancel_finds_every_attempt_held_here_and_is_remembered_for_later_ones() -> None:
    sessions = Sessions()
    session = streaming(sessions, slots=4)
    first, second = take(sessions, session, "t1", 1), take(sessions, session, "t1", 2)
    other = take(sessions, session, "t2")
    assert set(sessions.cancel("t1", "stop")) == {first, second}
    assert other.cancelling == ""
    assert sessions.cancelled["t1"] == "stop"
    assert sessions.cancel("t9", "") == []
    assert sessions.cancelled["t9"] == "cancelled", "a reason is always given"


def test_a_worker_that_does_not_stop_in_time_is_overdue_until_the_lease_ends() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t1")
    sessions.stopping(lease, "stop", deadline=5.0)
    assert lease.cancelling == "stop"
    assert sessions.overdue_cancels(4.0) == []
    assert sessions.overdue_cancels(6.0) == [lease]
    sessions.settle(lease.key, finished=True)
    assert sessions.overdue_cancels(7.0) == []


def test_a_queued_lease_past_its_start_deadline_is_taken_out_of_the_queue_once() -> None:
    sessions = Sessions(prefetch=2)
    session = streaming(sessions, slots=1)
    running = take(sessions, session, "running")
    late, patient = (
        sessions.take(session, (name, 1), payload=name, token=name, now=0.0, ack_timeout=5.0, queue=True)
        for name in ("late", "patient")
    )
    assert session.queued == 2
    assert session.worker_room == 0
    assert sessions.expired_queued(lambda lease: lease.payload == "late") == [late]
    assert sessions.expired_queued(lambda lease: lease.payload == "late") == [], "taken out once"
    assert sessions.settle(late.key) is late  # the caller settles it (EXPIRED)
    assert session.queued == 1
    sessions.settle(running.key, finished=True)
    assert sessions.forward_queued(session, 1.0, 5.0) == [patient], "the expired one is never sent"
