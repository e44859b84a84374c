"""The lifecycle emitter: a bounded buffer, group commit without timers, retries, stable event ids."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiormq
import aiormq.abc
import pamqp.commands
import pytest

from sluicegate import amqp
from sluicegate.lifecycle import (
    K,
    LifecycleEmitter,
    LifecycleSettings,
    assignment_event,
    encode_batch,
    event_id,
    result_event,
    task_event,
)
from sluicegate.v1 import messages_pb2

pytestmark = pytest.mark.timeout(10)

TOPOLOGY = amqp.Topology("unit")


class FakeExchange:
    """Stands in for an aio-pika exchange: records publishes, can hold them or lose their confirms."""

    name = "unit.events"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.confirmed: list[messages_pb2.LifecycleBatch] = []
        self.gate: asyncio.Event | None = None
        self.lose_confirms = 0
        self.unbound = False  # no queue takes the routing key: a mandatory publish is returned

    async def publish(self, message: Any, routing_key: str, *, mandatory: bool, timeout: float) -> None:
        self.calls.append({"id": message.message_id, "key": routing_key, "mandatory": mandatory})
        if self.gate is not None:
            await self.gate.wait()
        if self.lose_confirms:
            self.lose_confirms -= 1
            raise TimeoutError
        if self.unbound and mandatory:
            raise _returned(routing_key)
        self.confirmed.append(messages_pb2.LifecycleBatch.FromString(message.body))


def _returned(routing_key: str) -> aiormq.exceptions.PublishError:
    """What aiormq raises for a mandatory publish the broker returned."""
    returned = pamqp.commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key=routing_key)
    message = aiormq.abc.DeliveredMessage(delivery=returned, header=None, body=b"", channel=None)  # type: ignore[arg-type]
    return aiormq.exceptions.PublishError(message, returned)


def _task(n: int = 0) -> messages_pb2.Task:
    return messages_pb2.Task(task_id=f"task-{n}", tenant="acme", action="echo", payload=b"p", submitted_at_ms=5)


def _event(n: int) -> messages_pb2.LifecycleEvent:
    return task_event(K.KIND_SUBMITTED, _task(n), at_ms=1000 + n)


def _ids(batches: list[messages_pb2.LifecycleBatch]) -> list[str]:
    return [e.task_id for b in batches for e in b.events]


async def _running(emitter: LifecycleEmitter, exchange: FakeExchange) -> asyncio.Task[None]:
    task = asyncio.create_task(emitter.run(exchange))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_emit_buffers_without_a_running_loop() -> None:
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher")
    for n in range(10):
        emitter.emit(_event(n))
    assert emitter.buffered == 10
    assert emitter.emitted == 10
    assert emitter.dropped == 0


async def test_events_emitted_during_a_publish_go_out_together_in_the_next_message() -> None:
    exchange = FakeExchange()
    exchange.gate = asyncio.Event()
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher")
    task = await _running(emitter, exchange)

    emitter.emit(_event(0))
    await asyncio.sleep(0.01)  # the first publish is now in flight, held at the gate
    for n in range(1, 50):
        emitter.emit(_event(n))
    exchange.gate.set()
    assert await emitter.drain(timeout=2)
    await _stop(task)

    assert [len(b.events) for b in exchange.confirmed] == [1, 49]
    assert _ids(exchange.confirmed) == [f"task-{n}" for n in range(50)]
    assert emitter.published == 50
    assert emitter.batches == 2


async def test_no_timer_is_armed_to_emit_or_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    original = loop.call_at

    def spy(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return original(when, *args, **kwargs)

    exchange = FakeExchange()
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher")
    task = await _running(emitter, exchange)
    monkeypatch.setattr(loop, "call_at", spy)
    for n in range(20):
        emitter.emit(_event(n))
        await asyncio.sleep(0)  # let the loop publish between emits
    for _ in range(20):
        await asyncio.sleep(0)
    monkeypatch.undo()
    assert emitter.published == 20
    assert armed == [], "emitting and publishing must not arm timers"
    await _stop(task)


async def test_publishes_are_mandatory_and_use_the_lifecycle_routing_key() -> None:
    exchange = FakeExchange()
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher")
    task = await _running(emitter, exchange)
    emitter.emit(_event(1))
    assert await emitter.drain(timeout=2)
    await _stop(task)
    assert exchange.calls == [{"id": exchange.calls[0]["id"], "key": "lifecycle.dispatcher", "mandatory": True}]


async def test_with_no_recorder_bound_events_are_not_kept_and_not_built_for_a_while() -> None:
    exchange = FakeExchange()
    exchange.unbound = True
    now = [100.0]
    emitter = LifecycleEmitter(TOPOLOGY, "scheduler", clock=lambda: now[0])
    task = await _running(emitter, exchange)
    emitter.emit(_event(1))
    assert await emitter.drain(timeout=2)
    assert not emitter.wanted, "nobody records them: callers skip building events"
    emitter.emit(_event(2))  # dropped at once, counted
    assert (emitter.published, emitter.unrecorded) == (0, 2)
    now[0] += LifecycleEmitter.UNBOUND_PAUSE
    assert emitter.wanted, "a recorder may have appeared since: try again"
    exchange.unbound = False
    emitter.emit(_event(3))
    assert await emitter.drain(timeout=2)
    await _stop(task)
    assert _ids(exchange.confirmed) == ["task-3"]
    assert emitter.wanted


async def test_a_lost_confirm_is_retried_with_the_same_message_id() -> None:
    exchange = FakeExchange()
    exchange.lose_confirms = 2
    emitter = LifecycleEmitter(TOPOLOGY, "scheduler", confirm_timeout=0.1)
    task = await _running(emitter, exchange)
    emitter.emit(_event(1))
    emitter.emit(_event(2))
    assert await emitter.drain(timeout=5)
    await _stop(task)
    assert len(exchange.calls) == 3
    assert len({call["id"] for call in exchange.calls}) == 1, "a retry must look like the same message"
    assert _ids(exchange.confirmed) == ["task-1", "task-2"]
    assert emitter.retries == 2
    assert emitter.published == 2


async def test_a_full_buffer_drops_the_oldest_counts_them_and_warns_once_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.lifecycle")
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher", LifecycleSettings(buffer=5))
    for n in range(8):
        emitter.emit(_event(n))
    assert emitter.dropped == 3
    assert emitter.buffered == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1

    exchange = FakeExchange()
    task = await _running(emitter, exchange)
    assert await emitter.drain(timeout=2)
    assert _ids(exchange.confirmed) == [f"task-{n}" for n in range(3, 8)], "the oldest three were dropped"
    assert any("has room again" in r.getMessage() for r in caplog.records)

    await _stop(task)
    for n in range(8):
        emitter.emit(_event(n))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, "a new episode warns again"
    assert emitter.dropped == 6


async def test_batches_are_cut_by_count_and_by_size() -> None:
    exchange = FakeExchange()
    settings = LifecycleSettings(max_batch=3, max_batch_bytes=1024)
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher", settings)
    for n in range(7):
        emitter.emit(_event(n))
    big = assignment_event(K.KIND_COMPLETED, messages_pb2.Assignment(task=_task(99), attempt=1), output=b"x" * 5000)
    emitter.emit(big)
    emitter.emit(_event(100))
    task = await _running(emitter, exchange)
    assert await emitter.drain(timeout=2)
    await _stop(task)
    assert [len(b.events) for b in exchange.confirmed] == [3, 3, 1, 1, 1]
    assert exchange.confirmed[3].events[0].output == b"x" * 5000, "an event larger than a batch still goes, alone"


async def test_drain_reports_what_could_not_be_published_in_time() -> None:
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher")
    emitter.emit(_event(1))
    assert not await emitter.drain(timeout=0.05)  # nothing runs the loop
    assert await LifecycleEmitter(TOPOLOGY, "dispatcher").drain(timeout=0.05), "nothing to publish is drained"


def test_metrics_report_emitted_published_dropped_and_buffered() -> None:
    emitter = LifecycleEmitter(TOPOLOGY, "dispatcher", LifecycleSettings(buffer=2))
    for n in range(3):
        emitter.emit(_event(n))
    families = {f.name: f for f in emitter.metrics()}
    outcomes = {s.labels["outcome"]: s.value for s in families["sluicegate_lifecycle_events"].samples}
    assert outcomes == {"emitted": 3, "published": 0, "dropped": 1, "unrecorded": 0}
    assert families["sluicegate_lifecycle_buffered"].samples[0].value == 2
    assert families["sluicegate_lifecycle_publish_retries"].samples[0].value == 0


# Events and their ids.


def test_event_ids_are_stable_per_happening() -> None:
    assert event_id("t", 2, K.KIND_STARTED) == "t/2/started"
    assert event_id("t", 2, K.KIND_STARTED, "ignored") == "t/2/started", "one attempt starts once"
    assert event_id("t", 2, K.KIND_REQUEUED, "ack_timeout") == "t/2/requeued/ack_timeout"
    assert event_id("t", 0, K.KIND_WAITING, "no_worker") == "t/0/waiting/no_worker"
    assignment = messages_pb2.Assignment(task=_task(1), attempt=3, worker_id="w", dispatcher_id="d")
    first = assignment_event(K.KIND_ASSIGNED, assignment, at_ms=1)
    again = assignment_event(K.KIND_ASSIGNED, assignment, at_ms=2)
    assert first.event_id == again.event_id == "task-1/3/assigned"


def test_task_event_carries_the_task_only_when_asked() -> None:
    task = _task(4)
    submitted = task_event(K.KIND_SUBMITTED, task, include_task=True, at_ms=7)
    assert submitted.task == task
    assert (submitted.task_id, submitted.tenant, submitted.action, submitted.attempt) == ("task-4", "acme", "echo", 0)
    assert submitted.at_ms == 7
    rejected = task_event(K.KIND_REJECTED, task, error="bad payload")
    assert not rejected.HasField("task")
    assert rejected.error == "bad payload"
    assert rejected.at_ms > 0, "the time defaults to now"


def test_assignment_event_takes_worker_and_dispatcher_from_the_assignment_unless_given() -> None:
    assignment = messages_pb2.Assignment(task=_task(1), attempt=2, worker_id="w1", dispatcher_id="d1")
    assert (assignment_event(K.KIND_STARTED, assignment).worker_id, assignment.dispatcher_id) == ("w1", "d1")
    started = assignment_event(K.KIND_STARTED, assignment, worker_id="w2", dispatcher_id="d2")
    assert (started.worker_id, started.dispatcher_id, started.attempt) == ("w2", "d2", 2)
    requeued = assignment_event(K.KIND_REQUEUED, assignment, reason="lock_timeout", detail="slow")
    assert (requeued.reason, requeued.detail, requeued.event_id) == (
        "lock_timeout",
        "slow",
        "task-1/2/requeued/lock_timeout",
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (messages_pb2.TASK_STATUS_COMPLETED, K.KIND_COMPLETED),
        (messages_pb2.TASK_STATUS_FAILED, K.KIND_FAILED),
        (messages_pb2.TASK_STATUS_DEAD, K.KIND_DEAD),
        (messages_pb2.TASK_STATUS_CANCELLED, K.KIND_CANCELLED),
    ],
)
def test_result_event_matches_the_result(status: int, kind: int) -> None:
    assignment = messages_pb2.Assignment(task=_task(1), attempt=2, worker_id="w1", dispatcher_id="d1")
    result = messages_pb2.TaskResult(
        task_id="task-1",
        status=status,
        output=b"out",
        error="err",
        worker_id="w1",
        finished_at_ms=99,  # type: ignore[arg-type]
    )
    event = result_event(assignment, result)
    assert (event.kind, event.output, event.error, event.at_ms, event.attempt) == (kind, b"out", "err", 99, 2)


def test_result_event_refuses_a_status_that_is_not_terminal() -> None:
    with pytest.raises(ValueError, match="not terminal"):
        result_event(messages_pb2.Assignment(task=_task(1), attempt=1), messages_pb2.TaskResult(task_id="task-1"))


@pytest.mark.parametrize("output_bytes", [0, 100, 200, 20_000, 3_000_000])
def test_a_batch_built_from_serialized_events_is_the_protobuf_batch(output_bytes: int) -> None:
    assignment = messages_pb2.Assignment(task=_task(1), attempt=1)
    events = [_event(1), assignment_event(K.KIND_COMPLETED, assignment, output=b"o" * output_bytes), K()]
    encoded = encode_batch(e.SerializeToString() for e in events)
    assert encoded == messages_pb2.LifecycleBatch(events=events).SerializeToString()
    assert list(messages_pb2.LifecycleBatch.FromString(encoded).events) == events
