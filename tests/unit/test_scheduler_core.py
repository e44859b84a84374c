"""Unit tests of the scheduler's core: where a task goes, in which order, and what waits for a confirm."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from sluicegate import amqp
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.assignment import WorkerReport
from sluicegate_scheduler.core import Config, Core
from sluicegate_scheduler.items import Origin
from sluicegate_scheduler.limits import ConcurrencyLimits, Rate, RateLimits, Weights
from sluicegate_scheduler.outbox import Entry, Kind


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> int:
        return int(self.now * 1000)


def make_core(**config: object) -> tuple[Core, Clock]:
    clock = Clock()
    core = Core(Config(prefix="t", **config), clock=clock, wall=clock.wall, rng=random.Random(7))  # type: ignore[arg-type]
    return core, clock


def workers(core: Core, *specs: tuple[str, int], action: str = "a", labels: dict[str, str] | None = None) -> None:
    """Put workers (id, free slots) on dispatcher d1 in the core's view, every assignment so far consumed."""
    sent = {w.session_id: w.sent for w in core.pool}
    reports = [
        WorkerReport(
            worker_id=w,
            session_id=f"s-{w}",
            tenant="t1",
            actions=[action],
            labels=labels or {},
            slots=max(free, 1),
            free_slots=free,
            ready=True,
            received=sent.get(f"s-{w}", 0),
        )
        for w, free in specs
    ]
    seq = getattr(core, "_test_seq", 0) + 1
    core._test_seq = seq  # type: ignore[attr-defined]
    core.pool.update("d1", seq, False, reports, core.clock())


def task(i: int, **fields: object) -> messages_pb2.Task:
    values = {"task_id": f"task-{i}", "tenant": "t1", "action": "a", "reply_to": "c1", "submitted_at_ms": 1, **fields}
    return messages_pb2.Task(**values)  # type: ignore[arg-type]


def submit(core: Core, tasks: Iterable[messages_pb2.Task]) -> amqp.Delivery:
    batch = list(tasks)
    delivery = amqp.Delivery(object(), len(batch))
    core.take_tasks(batch, delivery)
    return delivery


def flush(core: Core, *, kinds: Iterable[Kind] = tuple(Kind), ok: bool = True) -> list[Entry]:
    """Confirm (or fail) every publish the core has queued; returns what was published."""
    published = []
    for destination in core.outbox.ready(lambda kind, _d: kind in tuple(kinds)):
        batch = core.outbox.take(destination)
        published += batch
        if ok:
            core.confirmed(destination[0], destination[1], batch)
        else:
            core.failed(destination[0], destination[1], batch)
        core.outbox.sent(destination)
    return published


def assigned(entries: Iterable[Entry]) -> list[tuple[str, str]]:
    return [(e.body.task.task_id, e.body.worker_id) for e in entries if e.kind == Kind.ASSIGN]


def lanes_ready(core: Core) -> None:
    for lane in core.book:
        lane.ready = True


# The fast path.


def test_a_task_that_can_be_placed_is_assigned_in_the_round_it_arrives_and_acked_after_the_confirm() -> None:
    core, _ = make_core()
    workers(core, ("w1", 2))
    delivery = submit(core, [task(1)])
    core.round()
    assert core.to_ack == []
    entries = flush(core)
    assert assigned(entries) == [("task-1", "w1")]
    assert core.to_ack == [delivery]
    assert core.waiting == 0


def test_nothing_is_acked_when_the_assignment_is_not_confirmed_and_it_is_placed_again() -> None:
    core, _ = make_core()
    workers(core, ("w1", 1))
    delivery = submit(core, [task(1)])
    core.round()
    flush(core, ok=False)
    assert core.to_ack == []
    core.round()  # back at the front of its lane: placed again
    assert assigned(flush(core)) == [("task-1", "w1")]
    assert core.to_ack == [delivery]


# Parking.


def test_a_task_nobody_serves_is_parked_not_held_and_its_delivery_is_acked_once_parked() -> None:
    core, _ = make_core()
    delivery = submit(core, [task(1, action="nobody")])
    core.round()
    lanes_ready(core)
    entries = flush(core)
    assert [e.kind for e in entries] == [Kind.PARK]
    assert core.to_ack == [delivery]
    (lane,) = core.book
    assert lane.held_bytes == 0
    assert lane.parked == 1
    assert lane.depth == 1


def test_a_full_worker_parks_what_does_not_fit_and_later_arrivals_queue_behind_it() -> None:
    core, _ = make_core()
    workers(core, ("w1", 1))
    submit(core, [task(1), task(2)])
    core.round()
    lanes_ready(core)
    first = flush(core)
    assert assigned(first) == [("task-1", "w1")]
    assert [e.body.task.task_id for e in first if e.kind == Kind.PARK] == ["task-2"]
    workers(core, ("w1", 1))  # a slot is free again, yet task-3 must not overtake task-2
    submit(core, [task(3)])
    core.round()
    assert [e.body.task.task_id for e in flush(core)] == ["task-3"]  # parked behind
    (lane,) = core.book
    lane_delivery = amqp.Delivery(object(), 2)
    parked = [messages_pb2.Parked(task=task(2), attempt=1), messages_pb2.Parked(task=task(3), attempt=1)]
    core.take_parked(parked, lane_delivery, Origin.LANE, lane)
    core.round()
    assert assigned(flush(core)) == [("task-2", "w1")]


def test_a_lane_copy_read_back_before_its_park_is_confirmed_is_the_task_not_a_duplicate() -> None:
    core, _ = make_core()
    intake = submit(core, [task(1, action="nobody")])
    core.round()
    lanes_ready(core)
    (destination,) = core.outbox.ready()
    batch = core.outbox.take(destination)  # published, confirm not here yet
    (lane,) = core.book
    workers(core, ("w1", 1), action="nobody")
    lane_delivery = amqp.Delivery(object(), 1)
    core.take_parked([messages_pb2.Parked(task=task(1, action="nobody"), attempt=1)], lane_delivery, Origin.LANE, lane)
    core.round()
    assert assigned(flush(core)) == [("task-1", "w1")]
    core.confirmed(*destination, batch)
    core.outbox.sent(destination)
    assert set(core.to_ack) == {intake, lane_delivery}
    assert core.stats.duplicate_tasks == 0
    assert not lane.backlogged, "the lane's count is back to nothing once both are known"


def test_a_second_copy_of_a_submitted_task_is_settled_as_a_duplicate() -> None:
    core, _ = make_core()
    workers(core, ("w1", 4))
    submit(core, [task(1)])
    core.round()
    flush(core)
    copy = submit(core, [task(1)])
    assert core.to_ack[-1] is copy
    assert core.stats.duplicate_tasks == 1


def test_a_session_that_ends_forgets_unconfirmed_parks_so_their_redelivery_is_taken_again() -> None:
    core, _ = make_core()
    submit(core, [task(1, action="nobody")])
    core.round()
    core.end_session()
    again = submit(core, [task(1, action="nobody")])
    assert core.stats.duplicate_tasks == 0
    core.round()
    lanes_ready(core)
    assert [e.kind for e in flush(core)] == [Kind.PARK]
    assert core.to_ack == [again]


def test_an_assignment_in_flight_when_the_session_ends_comes_again_as_the_same_attempt_to_the_same_worker() -> None:
    """Its publish may have reached the dispatcher: the copy must be one that dispatcher recognises
    (same attempt, same worker), never a next attempt that runs beside the first."""
    core, _ = make_core()
    workers(core, ("w1", 1), ("w2", 4))
    submit(core, [task(1), task(2)])
    core.round()
    (destination,) = core.outbox.ready()
    in_flight = core.outbox.take(destination)  # published; the broker goes away before confirming
    sent_to = {e.body.task.task_id: e.body.worker_id for e in in_flight}
    core.end_session()
    workers(core, ("w1", 4), ("w2", 4))  # whoever has room now
    core.take_tasks([task(1), task(2)], amqp.Delivery(object(), 2), redelivered=True)
    core.round()
    again = flush(core)
    if parked := [e for e in again if e.kind == Kind.PARK]:  # behind its lane's backlog: read back from there
        lane = core.book.lane_for(task(1))
        core.take_parked([e.body for e in parked], amqp.Delivery(object(), len(parked)), Origin.LANE, lane)
        core.round()
        again = flush(core)
    assert sorted(
        (e.body.task.task_id, e.body.attempt, e.body.worker_id) for e in again if e.kind == Kind.ASSIGN
    ) == sorted((t, 1, w) for t, w in sent_to.items())
    assert core.stats.duplicate_tasks == 0


def test_a_redelivered_task_nobody_here_sent_runs_as_the_next_attempt() -> None:
    core, _ = make_core()
    workers(core, ("w1", 4))
    core.take_tasks([task(1)], amqp.Delivery(object(), 1), redelivered=True)
    core.round()
    assert [e.body.attempt for e in flush(core) if e.kind == Kind.ASSIGN] == [2]


def test_a_park_in_flight_when_the_session_ends_is_continued_as_the_same_attempt_by_either_copy() -> None:
    """The park may have reached its lane: the intake's redelivery and the lane's copy are the same
    attempt, so whichever comes second is a duplicate - never a second attempt that runs beside it."""
    core, _ = make_core()
    submit(core, [task(1, action="b")])  # nobody serves b yet: parked
    core.round()
    lanes_ready(core)
    (destination,) = core.outbox.ready()
    (park,) = core.outbox.take(destination)  # published to the lane, its confirm lost
    core.end_session()
    workers(core, ("w1", 4), action="b")
    core.take_tasks([task(1, action="b")], amqp.Delivery(object(), 1), redelivered=True)
    core.round()
    lanes_ready(core)
    placed = flush(core)
    if parked := [e for e in placed if e.kind == Kind.PARK]:  # behind its lane's backlog: read back from there
        core.take_parked(
            [e.body for e in parked], amqp.Delivery(object(), 1), Origin.LANE, core.book.lane_for(park.body.task)
        )
        core.round()
        placed = flush(core)
    assert [e.body.attempt for e in placed if e.kind == Kind.ASSIGN] == [1]
    lane_copy = amqp.Delivery(object(), 1)
    core.take_parked([park.body], lane_copy, Origin.LANE, core.book.lane_for(park.body.task))  # the lane had it too
    core.round()
    assert [e for e in flush(core) if e.kind == Kind.ASSIGN] == [], "the lane's copy is a duplicate"
    assert lane_copy in core.to_ack


# Order: priority, then fairness, then first in first out.


def held_from_lanes(core: Core, tasks: list[messages_pb2.Task]) -> None:
    """Make tasks arrive from their lanes (as a backlog read back would)."""
    for t in tasks:
        lane = core.book.lane_for(t)
        core.take_parked([messages_pb2.Parked(task=t, attempt=1)], amqp.Delivery(object(), 1), Origin.LANE, lane)


def test_higher_priority_goes_first_and_equal_priority_keeps_arrival_order() -> None:
    core, _ = make_core()
    held_from_lanes(core, [task(i, priority=0) for i in range(5)] + [task(10 + i, priority=7) for i in range(3)])
    order = []
    for _ in range(8):
        workers(core, ("w1", 1))
        core.round()
        order += [t for t, _ in assigned(flush(core))]
    assert order == ["task-10", "task-11", "task-12", "task-0", "task-1", "task-2", "task-3", "task-4"]


def test_keys_share_one_slot_at_a_time_in_turn_whatever_their_backlog() -> None:
    core, _ = make_core()
    held_from_lanes(core, [task(i, fairness_key="big") for i in range(20)])
    held_from_lanes(core, [task(100 + i, fairness_key="small") for i in range(3)])
    order = []
    for _ in range(8):
        workers(core, ("w1", 1))  # one slot frees at a time
        core.round()
        order += [t for t, _ in assigned(flush(core))]
    smalls = [i for i, t in enumerate(order) if t.startswith("task-10")]
    assert smalls == [1, 3, 5] or smalls == [0, 2, 4], order


def test_weights_give_keys_shares_in_proportion() -> None:
    core, _ = make_core(fairness=Weights({"heavy": 3}))
    held_from_lanes(core, [task(i, fairness_key="heavy") for i in range(30)])
    held_from_lanes(core, [task(100 + i, fairness_key="light") for i in range(30)])
    workers(core, ("w1", 24))
    core.round()
    order = [t for t, _ in assigned(flush(core))]
    heavy = sum(1 for t in order if int(t.split("-")[1]) < 100)
    assert (heavy, len(order) - heavy) == (18, 6)


# Limits and affinity.


def test_a_concurrency_key_at_its_cap_waits_without_blocking_other_keys() -> None:
    core, _ = make_core(concurrency=ConcurrencyLimits({"a": 2}))
    held_from_lanes(core, [task(i, concurrency_key="k1") for i in range(5)])
    held_from_lanes(core, [task(100 + i, concurrency_key="k2") for i in range(5)])
    workers(core, ("w1", 10))
    core.round()
    placed = [t for t, _ in assigned(flush(core))]
    assert sorted(placed) == ["task-0", "task-1", "task-100", "task-101"]
    assert core.placement.blocked, "the keys at their cap are reported as waiting at a limit"


def test_the_cap_counts_leases_dispatchers_report_and_frees_when_they_end() -> None:
    core, clock = make_core(concurrency=ConcurrencyLimits({"a:k1": 1}))
    held_from_lanes(core, [task(i, concurrency_key="k1") for i in range(3)])
    workers(core, ("w1", 10))
    core.round()
    assert len(assigned(flush(core))) == 1
    report = WorkerReport("w1", "s-w1", "t1", ["a"], {}, 10, 9, True, received=1)
    core.pool.update("d1", 50, False, [report], clock(), [(("t1", "a", "k1"), 1)])
    core.round()
    assert assigned(flush(core)) == [], "still running, as the dispatcher says"
    core.pool.update("d1", 51, False, [report], clock(), [])  # finished: no lease of k1 left
    core.round()
    assert len(assigned(flush(core))) == 1


def test_a_rate_limit_lets_a_burst_through_then_one_task_per_refill() -> None:
    core, clock = make_core(rates=RateLimits({"a": Rate(2, 1.0)}))
    held_from_lanes(core, [task(i) for i in range(5)])
    workers(core, ("w1", 10))
    core.round()
    assert len(assigned(flush(core))) == 2
    assert core.wake_at == pytest.approx(clock() + 0.5)
    clock.now += 0.5
    core.round()
    assert len(assigned(flush(core))) == 1


def test_preferred_labels_win_over_free_slots_and_sticky_keys_stay_with_their_worker() -> None:
    core, _ = make_core()
    reports = [
        WorkerReport("gpu", "s-gpu", "t1", ["a"], {"kind": "gpu"}, 4, 1, True, 0),
        WorkerReport("cpu", "s-cpu", "t1", ["a"], {"kind": "cpu"}, 4, 4, True, 0),
    ]
    core.pool.update("d1", 1, False, reports, 0.0)
    preference = [messages_pb2.LabelPreference(key="kind", value="gpu", weight=10)]
    held_from_lanes(core, [task(1, preferred=preference)])
    core.round()
    assert assigned(flush(core)) == [("task-1", "gpu")]
    held_from_lanes(core, [task(2, sticky_key="s"), task(3, sticky_key="s")])
    core.round()
    (first,) = [w for t, w in assigned(flush(core)) if t == "task-2"] or [None]
    held_from_lanes(core, [task(4, sticky_key="s")])
    core.round()
    later = assigned(flush(core))
    assert all(w == first for _, w in later), later


# Delays, backoff, expiry.


def test_a_delayed_task_goes_onto_the_rung_that_does_not_overshoot_and_the_last_stretch_waits_in_memory() -> None:
    core, clock = make_core()
    workers(core, ("w1", 2))
    submit(core, [task(1, run_at_ms=clock.wall() + 5_000)])
    core.round()
    (entry,) = flush(core)
    assert (entry.kind, entry.destination) == (Kind.DELAY, "3200")
    clock.now += 4.9
    due = amqp.Delivery(object(), 1)
    core.take_parked([entry.body], due, Origin.DUE)
    core.round()
    assert assigned(flush(core)) == [], "100 ms early: held, not assigned"
    clock.now += 0.1
    core.round()
    assert assigned(flush(core)) == [("task-1", "w1")]
    assert due in core.to_ack


def test_a_handler_failure_waits_its_backoff_before_the_next_attempt() -> None:
    core, clock = make_core()
    stamped = task(1, max_retries=3, backoff=messages_pb2.Backoff(initial_ms=2000, max_ms=8000, no_jitter=True))
    failed = messages_pb2.Assignment(
        task=stamped,
        attempt=1,
        worker_id="w1",
        history=[messages_pb2.Requeue(reason=Reason.HANDLER_FAILED.value, attempt=1)],
    )
    core.take_requeued([failed], None, amqp.Delivery(object(), 1))
    core.round()
    (entry,) = flush(core)
    assert entry.kind == Kind.DELAY
    assert entry.body.not_before_ms == clock.wall() + 2000
    assert entry.body.attempt == 2
    assert entry.body.run_failures == 1


def test_out_of_dispatch_attempts_is_dead_and_the_client_hears_once_the_dead_letter_is_confirmed() -> None:
    core, _ = make_core(max_dispatch_attempts=2)
    lost = messages_pb2.Assignment(
        task=task(1),
        attempt=2,
        worker_id="w1",
        dispatch_failures=1,
        history=[messages_pb2.Requeue(reason=Reason.WORKER_LOST.value, attempt=2)],
    )
    delivery = amqp.Delivery(object(), 1)
    core.take_requeued([lost], None, delivery)
    first = flush(core)
    assert [e.kind for e in first] == [Kind.DEAD]
    second = flush(core)
    assert [(e.kind, e.body.status) for e in second] == [(Kind.RESULT, messages_pb2.TASK_STATUS_DEAD)]
    assert core.to_ack == [delivery]
    assert core.stats.dead == 1


def test_a_waiting_task_past_its_schedule_timeout_expires_and_its_lane_copy_is_dropped() -> None:
    core, clock = make_core()
    submit(core, [task(1, action="nobody", submitted_at_ms=clock.wall(), schedule_timeout_ms=1000)])
    core.round()
    lanes_ready(core)
    flush(core)
    clock.now += 1.5
    core.round()
    (result,) = flush(core)
    assert result.kind == Kind.RESULT
    assert result.body.status == messages_pb2.TASK_STATUS_EXPIRED
    assert "not started within 1000 ms" in result.body.error
    (lane,) = core.book
    copy = amqp.Delivery(object(), 1)
    parked = messages_pb2.Parked(task=task(1, action="nobody", submitted_at_ms=1, schedule_timeout_ms=1000), attempt=1)
    core.take_parked([parked], copy, Origin.LANE, lane)
    assert core.to_ack[-1] is copy
    assert not lane.held


# Which lanes to read, and memory.


def test_lanes_are_read_while_someone_serves_them_and_deleted_once_idle() -> None:
    core, clock = make_core(lane_idle=10.0)
    submit(core, [task(1, action="nobody")])
    core.round()
    lanes_ready(core)
    flush(core)
    (lane,) = core.book
    assert core.consumption() == ([], [])
    workers(core, ("w1", 1), action="nobody")
    assert core.consumption() == ([lane], [])
    lane.consuming = True
    parked = messages_pb2.Parked(task=task(1, action="nobody"), attempt=1)
    core.take_parked([parked], amqp.Delivery(object(), 1), Origin.LANE, lane)
    core.round()
    flush(core)
    assert core.idle_lanes() == []
    clock.now += 11
    assert core.idle_lanes() == [lane]
    core.lane_deleted(lane)
    assert len(core.book) == 0


def test_past_the_memory_budget_lanes_holding_tasks_stop_being_read() -> None:
    core, _ = make_core(held_budget=1000)
    workers(core, ("w1", 0))
    held_from_lanes(core, [task(i, payload=b"x" * 300) for i in range(5)])
    (lane,) = core.book
    lane.ready, lane.consuming, lane.parked = True, True, 10
    assert core.consumption() == ([], [lane])


def test_past_max_lanes_keyed_tasks_share_an_overflow_lane_that_looks_past_a_blocked_head() -> None:
    core, _ = make_core(max_lanes=1, concurrency=ConcurrencyLimits({"a:busy": 1}))
    held_from_lanes(core, [task(0, concurrency_key="busy")])
    held_from_lanes(core, [task(1, concurrency_key="busy"), task(2, concurrency_key="free")])
    assert len(core.book) == 2
    workers(core, ("w1", 10))
    core.round()
    assert sorted(t for t, _ in assigned(flush(core))) == ["task-0", "task-2"]


def test_an_assignment_whose_confirm_was_lost_goes_to_the_same_worker_again_even_after_the_session_ends() -> None:
    core, _ = make_core()
    workers(core, ("w1", 1), ("w2", 4))
    submit(core, [task(1)])
    core.round()
    (first,) = assigned(flush(core, ok=False))  # published, its confirm lost
    workers(core, ("w1", 4), ("w2", 4))
    core.round()
    assert assigned(flush(core, ok=False)) == [first], "the same worker, while the session lasts"
    core.end_session()
    core.take_tasks([task(1)], amqp.Delivery(object(), 1), redelivered=True)
    core.round()
    again = flush(core)
    if parked := [e for e in again if e.kind == Kind.PARK]:
        core.take_parked([e.body for e in parked], amqp.Delivery(object(), 1), Origin.LANE, core.book.lane_for(task(1)))
        core.round()
        again = flush(core)
    assert [(e.body.worker_id, e.body.attempt) for e in again if e.kind == Kind.ASSIGN] == [(first[1], 1)]
