"""Bodies that used to stick: each is settled, with a reason or a result, and harms no other task."""

from __future__ import annotations

import pytest

from sluicegate import amqp
from sluicegate.bodies import TaskIds, check_assignment, check_state, fingerprint, first_of_each, valid_cancels
from sluicegate.errors import InvalidInput
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.assignment import WorkerPool, WorkerReport
from sluicegate_scheduler.outbox import Kind

from .test_scheduler_core import assigned, flush, make_core, submit, task, workers


def test_a_requeued_assignment_with_no_tenant_or_action_goes_to_dead_with_a_reason_and_is_acked() -> None:
    core, _ = make_core()
    workers(core, ("w1", 2))
    bad = messages_pb2.Assignment(task=messages_pb2.Task(task_id="x1", reply_to="c1"), attempt=1, worker_id="w1")
    delivery = amqp.Delivery(object(), 1)
    core.take_requeued([bad], None, delivery)
    core.round()
    entries = flush(core)
    dead = [e for e in entries if e.kind == Kind.DEAD]
    assert [e.destination for e in dead] == [Reason.INVALID.value]
    assert "action" in dead[0].body.reasons[-1].detail
    flush(core)  # the DEAD result to the client
    assert core.to_ack == [delivery]
    submit(core, [task(1)])  # an honest task still goes
    core.round()
    assert assigned(flush(core)) == [("task-1", "w1")]


def test_a_parked_item_that_no_scheduler_would_park_goes_to_dead() -> None:
    core, _ = make_core()
    delivery = amqp.Delivery(object(), 1)
    from sluicegate_scheduler.items import Origin

    core.take_parked([messages_pb2.Parked(task=messages_pb2.Task(task_id="p1"), attempt=1)], delivery, Origin.DUE)
    core.round()
    entries = flush(core)
    assert [e.kind for e in entries] == [Kind.DEAD]
    assert core.to_ack == [delivery]


def test_a_reused_task_id_gets_a_rejected_result_and_the_first_task_still_runs() -> None:
    core, _ = make_core()
    first = submit(core, [task(1, payload=b"first")])
    second = submit(core, [task(1, payload=b"other", reply_to="c2")])
    results = [e for e in flush(core) if e.kind == Kind.RESULT]
    assert [(e.destination, e.body.status) for e in results] == [("c2", messages_pb2.TASK_STATUS_REJECTED)]
    assert "already used" in results[0].body.error
    assert core.to_ack == [second]
    assert core.stats.reused_ids == 1
    workers(core, ("w1", 1))
    core.round()
    assert assigned(flush(core)) == [("task-1", "w1")]  # untouched by the refusal
    assert first in core.to_ack


def test_the_same_content_again_is_a_copy_of_the_first_submission_not_a_reuse() -> None:
    core, _ = make_core()
    submit(core, [task(1, payload=b"same", submitted_at_ms=5, trace={"traceparent": "a"})])
    again = submit(core, [task(1, payload=b"same", submitted_at_ms=9, trace={"traceparent": "b"})])
    assert core.to_ack == [again]  # settled as a copy: the first task's result answers it
    assert [e for e in flush(core) if e.kind == Kind.RESULT] == []
    assert core.stats.reused_ids == 0


def test_task_ids_forget_the_oldest_and_a_forgotten_id_is_never_refused() -> None:
    ids = TaskIds(remember=2)
    for i in range(3):
        ids.note(task(i))
    assert len(ids) == 2
    assert not ids.reused(task(0, payload=b"changed"))
    assert ids.reused(task(2, payload=b"changed"))
    assert fingerprint(task(2)) == fingerprint(task(2, submitted_at_ms=77))


def test_an_inbox_batch_keeps_the_first_of_each_attempt() -> None:
    a = messages_pb2.Assignment(task=task(1), attempt=1)
    b = messages_pb2.Assignment(task=task(2), attempt=1)
    unique, copies = first_of_each([a, b, a, messages_pb2.Assignment(task=task(1), attempt=2)])
    assert [(x.task.task_id, x.attempt) for x in unique] == [("task-1", 1), ("task-2", 1), ("task-1", 2)]
    assert copies == [a]


@pytest.mark.parametrize(
    ("assignment", "words"),
    [
        (messages_pb2.Assignment(attempt=1), "no task"),
        (messages_pb2.Assignment(task=task(1), attempt=0), "attempt"),
        (messages_pb2.Assignment(task=task(1, tenant=""), attempt=1), "tenant"),
        (messages_pb2.Assignment(task=task(1), attempt=1, worker_id="a b"), "worker_id"),
    ],
)
def test_check_assignment_names_what_is_wrong(assignment: messages_pb2.Assignment, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        check_assignment(assignment)


def _state(**worker: object) -> messages_pb2.DispatcherState:
    values = {"worker_id": "w1", "session_id": "ab12", "tenant": "t", "actions": ["a"], "slots": 2, **worker}
    return messages_pb2.DispatcherState(dispatcher_id="d1", seq=1, workers=[messages_pb2.WorkerState(**values)])  # type: ignore[arg-type]


def test_check_state_refuses_what_no_dispatcher_sends() -> None:
    check_state(_state())
    for bad in (
        _state(tenant=""),
        _state(actions=[]),
        _state(slots=0),
        _state(free_slots=100),
        _state(session_id="x y"),
        _state(session_id=""),
    ):
        with pytest.raises(InvalidInput):
            check_state(bad)
    with pytest.raises(InvalidInput):
        check_state(messages_pb2.DispatcherState(dispatcher_id=""))


def test_valid_cancels_drop_and_count_what_names_no_task() -> None:
    good, bad = valid_cancels(
        [messages_pb2.Cancel(task_id="t-1"), messages_pb2.Cancel(task_id=""), messages_pb2.Cancel(task_id="a b")]
    )
    assert [c.task_id for c in good] == ["t-1"]
    assert bad == 2


def _report(worker: str, principal: str) -> WorkerReport:
    return WorkerReport(
        worker_id=worker, session_id=f"s-{worker}", tenant="t", actions=["a"], labels={}, slots=1,
        free_slots=1, ready=True, received=0, principal=principal,
    )  # fmt: skip


def test_a_stall_cools_every_session_of_its_principal_not_only_the_worker() -> None:
    pool = WorkerPool()
    pool.update(
        "d1", 1, False, [_report("bad-1", "mallory"), _report("bad-2", "mallory"), _report("good", "alice")], 0.0
    )
    pool.cool_down("bad-1", now=0.0, base=5.0)
    picks = {pool.pick("t", "a", {}, now=1.0).worker_id for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"good"}, "bad-2 shares bad-1's principal, so it is cooled too"
    assert pool.pick("t", "a", {}, now=10.0) is not None
    picks = {pool.pick("t", "a", {}, now=10.0).worker_id for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"bad-1", "bad-2", "good"}, "the cooldown ends"


def test_a_tenant_past_its_waiting_limit_gets_rejected_results_and_other_tenants_do_not() -> None:
    core, clock = make_core(max_waiting_per_tenant=2)
    taken = submit(core, [task(1), task(2)])
    refused = submit(core, [task(3)])
    other = submit(core, [task(4, tenant="t2")])
    core.round()
    entries = flush(core)
    results = [e.body for e in entries if e.kind == Kind.RESULT]
    assert [(r.task_id, r.status) for r in results] == [("task-3", messages_pb2.TASK_STATUS_REJECTED)]
    assert "has 2 tasks waiting" in results[0].error
    assert {e.body.task.task_id for e in entries if e.kind == Kind.PARK} == {"task-1", "task-2", "task-4"}
    assert refused in core.to_ack
    assert taken in core.to_ack
    assert other in core.to_ack
    # Once its lane drains the tenant may submit again, the refused id too.
    for lane in core.book:
        lane.taken(lane.parked or 0)
    clock.now += 1.0
    again = submit(core, [task(3)])
    core.round()
    assert [e.kind for e in flush(core)] == [Kind.PARK]
    assert again in core.to_ack
