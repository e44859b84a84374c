"""Property-based tests of the pure checks and of the scheduler's core under arbitrary bodies.

The checks raise nothing but InvalidInput whatever they are given; the core, fed any mix of
submitted, requeued and parked bodies, settles every delivery and still places an honest task.
Bounded: a fixed number of derandomized examples each, a few seconds in all.
"""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate import amqp
from sluicegate.bodies import check_assignment, check_state, valid_cancels
from sluicegate.errors import InvalidInput, LimitExceeded
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate_dispatcher.limits import EdgeLimits, check_registration
from sluicegate_dispatcher.service import Undecodable, decode
from sluicegate_recorder.fold import problem
from sluicegate_scheduler.items import Origin
from sluicegate_scheduler.outbox import Kind

from .test_scheduler_core import assigned, flush, lanes_ready, make_core, task, workers

BOUNDED = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
NAMES = st.one_of(st.sampled_from(["t1", "a", "w1", "fuzzed", ""]), st.text(max_size=10))
U32 = st.integers(min_value=0, max_value=2**32 - 1)

tasks = st.builds(
    messages_pb2.Task,
    task_id=NAMES,
    tenant=st.sampled_from(["t1", "t2", "", "bad tenant"]),
    action=st.sampled_from(["fuzzed", "", "9x"]),  # never the honest task's action
    payload=st.binary(max_size=16),
    priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    run_at_ms=st.sampled_from([0, 1, 100_050, 100_300, 2**40]),
    schedule_timeout_ms=st.sampled_from([0, 1, 10_000]),
    submitted_at_ms=st.sampled_from([0, 1, 100_000]),
    reply_to=st.sampled_from(["", "c1"]),
    concurrency_key=st.sampled_from(["", "k", "bad key"]),
)
requeues = st.builds(
    messages_pb2.Requeue, reason=st.sampled_from(["lock_timeout", "handler_failed", "invalid", "nonsense", ""])
)
assignments = st.builds(
    messages_pb2.Assignment,
    task=tasks,
    attempt=U32,
    worker_id=NAMES,
    dispatch_failures=U32,
    run_failures=U32,
    history=st.lists(requeues, max_size=2),
)
parked = st.builds(messages_pb2.Parked, task=tasks, attempt=U32)


@BOUNDED
@given(assignments)
def test_check_assignment_raises_only_invalid_input(assignment: messages_pb2.Assignment) -> None:
    with contextlib.suppress(InvalidInput):
        check_assignment(assignment)


@BOUNDED
@given(st.binary(max_size=300))
def test_check_state_and_cancels_take_any_decodable_bytes(body: bytes) -> None:
    try:
        state = messages_pb2.DispatcherState.FromString(body)
    except Exception:
        return
    with contextlib.suppress(InvalidInput):
        check_state(state)
    try:
        cancels = messages_pb2.CancelBatch.FromString(body).cancels
    except Exception:
        return
    good, bad = valid_cancels(cancels)
    assert len(good) + bad == len(cancels)


@BOUNDED
@given(st.binary(max_size=300))
def test_decode_answers_a_request_or_undecodable(body: bytes) -> None:
    outcomes: list[object] = []
    for kind in (worker_pb2.RegisterRequest, worker_pb2.WorkerMessage):
        try:
            outcomes.append(decode(kind, body))
        except Undecodable as err:
            outcomes.append(str(err))
    for kind, outcome in zip((worker_pb2.RegisterRequest, worker_pb2.WorkerMessage), outcomes, strict=True):
        assert isinstance(outcome, kind) or outcome == f"request body does not decode as a {kind.DESCRIPTOR.name}"
    request = outcomes[0]
    if isinstance(request, worker_pb2.RegisterRequest):
        with contextlib.suppress(LimitExceeded):  # RESOURCE_EXHAUSTED; anything else fails the test
            check_registration(EdgeLimits(), request.actions, request.labels)


@BOUNDED
@given(st.binary(max_size=300))
def test_the_recorder_check_takes_any_lifecycle_event(body: bytes) -> None:
    try:
        batch = messages_pb2.LifecycleBatch.FromString(body)
    except Exception:
        return
    for event in batch.events:
        assert problem(event) is None or isinstance(problem(event), str)


Body = tuple[str, list[object]]
bodies = st.lists(
    st.one_of(
        st.tuples(st.just("tasks"), st.lists(tasks, max_size=4)),
        st.tuples(st.just("requeue"), st.lists(assignments, max_size=4)),
        st.tuples(st.just("due"), st.lists(parked, max_size=4)),
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(bodies)
def test_the_core_settles_every_delivery_it_is_given_and_still_places_an_honest_task(given_bodies: list[Body]) -> None:
    core, clock = make_core()
    workers(core, ("w1", 4))
    deliveries = []
    for kind, items in given_bodies:
        delivery = amqp.Delivery(object(), len(items))
        if kind == "tasks":
            core.take_tasks(items, delivery)  # type: ignore[arg-type]
        elif kind == "requeue":
            core.take_requeued(items, None, delivery)  # type: ignore[arg-type]
        else:
            core.take_parked(items, delivery, Origin.DUE)  # type: ignore[arg-type]
        deliveries.append(delivery)
    for _ in range(4):  # past every hold: the requeue hold, a delay's last stretch in memory
        clock.now += 1.0
        core.round()
        lanes_ready(core)
        flush(core)
    assert [d.pending for d in deliveries if d.pending > 0] == [], "every item found its fate"
    core.to_ack.clear()
    honest = amqp.Delivery(object(), 1)
    core.take_tasks([task(10_000, action="a")], honest)
    core.round()
    entries = flush(core)
    assert ("task-10000", "w1") in assigned(entries)
    assert core.to_ack == [honest]
    assert not [e for e in entries if e.kind == Kind.DEAD and e.body.task.task_id == "task-10000"]
