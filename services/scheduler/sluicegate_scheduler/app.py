"""The scheduler process: takes submitted and requeued tasks, assigns them to workers, publishes assignments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, telemetry
from sluicegate.errors import InvalidInput, PublishError, Unroutable
from sluicegate.reasons import Reason
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate.validation import check_task
from sluicegate.wire import now_ms
from sluicegate_scheduler.assignment import Waiting, WorkerPool, WorkerReport, WorkerView
from sluicegate_scheduler.metrics import SchedulerMetrics
from sluicegate_scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)

# A worker that failed a dispatch for one of these is likely stalled or gone: others get its work first.
STALL_REASONS = frozenset(
    {Reason.LOCK_TIMEOUT, Reason.STREAM_STALLED, Reason.ACK_TIMEOUT, Reason.STREAM_BROKEN, Reason.WORKER_LOST}
)
X_DEATH_REASONS = {"expired": Reason.LEASE_EXPIRED, "rejected": Reason.REJECTED}


class Source:
    """One consumed message and how many of its tasks are not placed yet; acked when none are left."""

    __slots__ = ("message", "pending")

    def __init__(self, message: AbstractIncomingMessage, pending: int) -> None:
        self.message = message
        self.pending = pending


@dataclass(slots=True, eq=False)
class Pending:
    """A task waiting for a worker, with what its earlier attempts left behind."""

    task: messages_pb2.Task
    source: Source
    attempt: int = 1
    dispatch_failures: int = 0
    run_failures: int = 0
    history: list[messages_pb2.Requeue] = field(default_factory=list)
    avoid: frozenset[str] = frozenset()
    trace: dict[str, str] = field(default_factory=dict)  # where this task's trace continues from


Placed = tuple[Pending, messages_pb2.Assignment, WorkerView, Span]


@dataclass(slots=True)
class SchedulerStats:
    received: int = 0
    assigned: int = 0
    requeued: Counter[str] = field(default_factory=Counter)
    dead: int = 0
    rejected: int = 0
    duplicate_requeues: int = 0
    duplicate_tasks: int = 0
    unroutable_assignments: int = 0


class Scheduler:
    """Assigns every task to a worker that serves its action and has a free slot.

    A consumed task message is acked only after every task in it is either published as an
    assignment and confirmed by the broker, or published to the dead queue.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        broker: BrokerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix)
        self.instance_id = uuid.uuid4().hex[:12]
        self.pool = WorkerPool()
        self.waiting = Waiting()
        self.stats = SchedulerStats()
        self.metrics = SchedulerMetrics(self)
        self.clock = clock
        self._state = "new"
        self._connection: AbstractRobustConnection | None = None
        self._exchanges = amqp.Exchanges(self.topology)
        self._wake = asyncio.Event()
        # (task, attempt) requeued -> its Pending until placed or buried, then None (as for tasks).
        self._requeued: OrderedDict[tuple[str, int], Pending | None] = OrderedDict()
        # Task id -> its Pending until placed or buried, then None: a task message redelivered after
        # a reconnect (or published twice by a client retry) must not place the same attempt twice.
        self._tasks_seen: OrderedDict[str, Pending | None] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self._outbox: dict[str, list[Placed]] = {}  # placed, not yet published, per dispatcher
        self._sending: set[str] = set()  # dispatchers with a publish in flight
        self._consumers: list[tuple[AbstractQueue, str]] = []

    @property
    def ready(self) -> bool:
        return self._state == "running"

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"scheduler is {self._state}")
        self._state = "starting"
        t = self.topology
        self._connection = await amqp.connect_broker(self.broker)
        publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._exchanges.declare(publish_channel)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        state_queue = await channel.declare_queue(
            t.scheduler_state_queue(self.instance_id), durable=False, exclusive=True, auto_delete=True
        )
        await state_queue.bind(t.events, routing_key="state.*")
        # Passively declared, not just named (`ensure=False`): only a queue the robust channel
        # declared is re-declared after a reconnect, and with it the consumer; otherwise the
        # scheduler silently stops consuming after the first lost broker connection.
        tasks_queue = await channel.declare_queue(t.tasks, passive=True)
        requeue_queue = await channel.declare_queue(t.requeue, passive=True)
        self._spawn(self._pump(), "pump")
        self._spawn(self._forget_silent(), "forget")
        self._consumers.append((state_queue, await state_queue.consume(self._on_state, no_ack=True)))
        self._consumers.append((tasks_queue, await tasks_queue.consume(self._on_tasks)))
        self._consumers.append((requeue_queue, await requeue_queue.consume(self._on_requeue)))
        self._state = "running"
        log.info("scheduler %s consuming %s and %s", self.instance_id, t.tasks, t.requeue)

    async def close(self) -> None:
        """Stop consuming and release what is held (the broker redelivers it); idempotent."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._state = "closed"

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"scheduler-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Consumers.

    async def _on_state(self, message: AbstractIncomingMessage) -> None:
        try:
            state = messages_pb2.DispatcherState.FromString(message.body)
        except DecodeError:
            log.warning("ignoring a worker-state message that does not decode")
            return
        reports = [
            WorkerReport(
                worker_id=w.worker_id,
                session_id=w.session_id,
                tenant=w.tenant,
                actions=w.actions,
                labels=dict(w.labels),
                slots=w.slots,
                free_slots=w.free_slots,
                ready=w.ready,
                received=w.received,
            )
            for w in state.workers
        ]
        if self.pool.update(state.dispatcher_id, state.seq, state.draining, reports, self.clock()):
            self._wake.set()

    async def _on_tasks(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = messages_pb2.TaskBatch.FromString(message.body)
        except DecodeError:
            await self._bury_raw(message, "task message does not decode")
            return
        source = Source(message, len(batch.tasks))
        if source.pending == 0:
            await self._settle(source.message)
        for task in batch.tasks:
            self.stats.received += 1
            if task.task_id in self._tasks_seen:
                self.stats.duplicate_tasks += 1
                await self._another_copy(self._tasks_seen[task.task_id], source)
                continue
            try:
                check_task(task, self.settings.max_payload_bytes)
            except InvalidInput as err:
                self.stats.rejected += 1
                record = messages_pb2.Requeue(reason=Reason.INVALID.value, detail=str(err), at_ms=now_ms())
                await self._bury(Pending(task=task, source=source, history=[record]), messages_pb2.TASK_STATUS_REJECTED)
                continue
            item = Pending(task=task, source=source, trace=dict(task.trace))
            self._remember(self._tasks_seen, task.task_id, item)
            self._wait(item)

    async def _on_requeue(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = messages_pb2.AssignmentBatch.FromString(message.body)
        except DecodeError:
            await self._bury_raw(message, "requeued message does not decode")
            return
        source = Source(message, len(batch.assignments))
        if source.pending == 0:
            await self._settle(source.message)
        broker_reason = self._x_death_reason(message)
        for a in batch.assignments:
            key = (a.task.task_id, a.attempt)
            if key in self._requeued:
                self.stats.duplicate_requeues += 1
                await self._another_copy(self._requeued[key], source)
                continue
            history = list(a.history)
            if broker_reason is not None:
                history.append(
                    messages_pb2.Requeue(
                        reason=broker_reason.value,
                        detail="dead-lettered by the broker",
                        worker_id=a.worker_id,
                        attempt=a.attempt,
                        at_ms=now_ms(),
                    )
                )
            reason = _reason_of(history)
            self.stats.requeued[reason.value] += 1
            if reason in STALL_REASONS and a.worker_id:
                self.pool.cool_down(a.worker_id, self.clock(), self.settings.worker_cooldown.total_seconds())
            item = Pending(
                task=a.task,
                source=source,
                attempt=a.attempt + 1,
                dispatch_failures=a.dispatch_failures + reason.counts_as_dispatch_failure,
                run_failures=a.run_failures + (reason == Reason.HANDLER_FAILED),
                history=history,
                avoid=frozenset({a.worker_id}) if a.worker_id else frozenset(),
                trace=dict(a.trace) or dict(a.task.trace),
            )
            self._remember(self._requeued, key, item)
            if reason == Reason.INVALID or item.dispatch_failures >= self.settings.max_dispatch_attempts:
                await self._bury(item, messages_pb2.TASK_STATUS_DEAD)
            else:
                # Ahead of new arrivals of its priority: a stranded task must not queue behind a backlog.
                self.waiting.requeue_front((a.task.tenant, a.task.action), item, a.task.priority)
                self._wake.set()

    @staticmethod
    def _x_death_reason(message: AbstractIncomingMessage) -> Reason | None:
        """The broker's reason, for a message it dead-lettered itself rather than one republished."""
        headers = message.headers or {}
        if amqp.REASON_HEADER in headers:
            return None
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            raw = deaths[0].get("reason")
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            return X_DEATH_REASONS.get(name, Reason.LEASE_EXPIRED)
        return Reason.LEASE_EXPIRED

    # Placing tasks.

    def _wait(self, item: Pending) -> None:
        self.waiting.push(item.task.tenant, item.task.action, item.task.priority, item)
        self._wake.set()

    async def _pump(self) -> None:
        """Place waiting tasks whenever something changed; sleeps while nothing can be placed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batches: dict[str, list[Placed]] = {}
            now = self.clock()
            for key in self.waiting.lanes():
                while (item := self.waiting.peek(key)) is not None:
                    task = item.task
                    worker = self.pool.pick(task.tenant, task.action, dict(task.labels), item.avoid, now)
                    if worker is None:
                        break
                    self.waiting.pop(key)
                    self.pool.assigned(worker)
                    assignment, span = self._assignment(item, worker)
                    batches.setdefault(worker.dispatcher_id, []).append((item, assignment, worker, span))
            for dispatcher_id, placed in batches.items():
                self._outbox.setdefault(dispatcher_id, []).extend(placed)
                if dispatcher_id not in self._sending:
                    self._sending.add(dispatcher_id)
                    self._spawn(self._send_outbox(dispatcher_id), "publish")

    async def _send_outbox(self, dispatcher_id: str) -> None:
        """One publish in flight per dispatcher; what is placed meanwhile goes in the next, larger one.

        A lone task goes out at once; under load batches grow up to max_batch by themselves.
        """
        try:
            while queue := self._outbox.get(dispatcher_id):
                batch = queue[: self.settings.max_batch]
                del queue[: len(batch)]
                await self._publish(dispatcher_id, batch)
        finally:
            self._sending.discard(dispatcher_id)
            if not self._outbox.get(dispatcher_id):
                self._outbox.pop(dispatcher_id, None)

    def _assignment(self, item: Pending, worker: WorkerView) -> tuple[messages_pb2.Assignment, Span]:
        span = telemetry.start(
            f"{'reassign' if item.attempt > 1 else 'assign'} {item.task.action}",
            item.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                item.task.task_id,
                item.attempt,
                **{
                    "sluicegate.worker.id": worker.worker_id,
                    "sluicegate.requeue.reason": item.history[-1].reason if item.history else None,
                    "messaging.destination.name": self.topology.assign,
                    "messaging.rabbitmq.destination.routing_key": worker.dispatcher_id,
                    "messaging.operation.type": "publish",
                },
            ),
        )
        assignment = messages_pb2.Assignment(
            task=item.task,
            attempt=item.attempt,
            worker_id=worker.worker_id,
            session_id=worker.session_id,
            dispatcher_id=worker.dispatcher_id,
            dispatch_failures=item.dispatch_failures,
            run_failures=item.run_failures,
            history=item.history,
            assigned_at_ms=now_ms(),
        )
        telemetry.carry(span, assignment.trace)
        return assignment, span

    async def _publish(self, dispatcher_id: str, placed: list[Placed]) -> None:
        body = messages_pb2.AssignmentBatch(assignments=[a for _, a, _, _ in placed]).SerializeToString()
        self.metrics.batch_size.observe(len(placed))
        try:
            await amqp.publish(self._exchanges.assign, dispatcher_id, body, timeout=self.broker.confirm_timeout_s)
        except (Unroutable, PublishError) as err:
            # Not placed: back to the front of the line. An unroutable inbox means that dispatcher is gone.
            if isinstance(err, Unroutable):
                self.stats.unroutable_assignments += len(placed)
                self.pool.forget(dispatcher_id)
            log.warning("assignments to %s not confirmed (%s); placing them again", dispatcher_id, err)
            for item, _, worker, span in placed:
                telemetry.fail(span, "assignment not confirmed")
                span.end()
                self.pool.unassigned(worker)
                self.waiting.requeue_front((item.task.tenant, item.task.action), item, item.task.priority)
            await asyncio.sleep(0.05 if isinstance(err, Unroutable) else 0.5)
            self._wake.set()
            return
        self.stats.assigned += len(placed)
        for item, _, _, span in placed:
            span.end()
            self.waiting.placed(item)
            self._forget_pending(item)
            await self._done(item.source)

    async def _bury(self, item: Pending, status: messages_pb2.TaskStatus.ValueType) -> None:
        """Publish a task that can never run to the dead queue, tell its client, then count it settled."""
        task = item.task
        span = telemetry.start(
            "dead" if status == messages_pb2.TASK_STATUS_DEAD else "reject",
            item.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                task.task_id, item.attempt - 1, **{"messaging.destination.name": self.topology.dead}
            ),
        )
        telemetry.fail(span, item.history[-1].reason if item.history else "dead")
        span.end()
        dead = messages_pb2.DeadLetter(task=task, reasons=item.history, at_ms=now_ms())
        await amqp.publish_until_confirmed(
            self._exchanges.dead,
            "",
            messages_pb2.DeadLetterBatch(dead=[dead]).SerializeToString(),
            headers={amqp.REASON_HEADER: item.history[-1].reason if item.history else "unknown"},
            timeout=self.broker.confirm_timeout_s,
        )
        self.stats.dead += status == messages_pb2.TASK_STATUS_DEAD
        log.warning(
            "task %s is dead after %d attempts",
            task.task_id,
            item.attempt - 1,
            extra={"task_id": task.task_id, "trace_id": span.get_span_context().trace_id or None},
        )
        if task.reply_to:
            reasons = "; ".join(f"{r.reason}: {r.detail}" if r.detail else r.reason for r in item.history[-5:])
            result = messages_pb2.TaskResult(
                task_id=task.task_id,
                status=status,
                error=reasons,
                attempt=item.attempt - 1,
                submitted_at_ms=task.submitted_at_ms,
                finished_at_ms=now_ms(),
                history=item.history,
                trace=task.trace,
            )
            with contextlib.suppress(Unroutable, PublishError):
                await amqp.publish(
                    self._exchanges.events,
                    self.topology.result_key(task.reply_to),
                    messages_pb2.TaskResultBatch(results=[result]).SerializeToString(),
                    timeout=self.broker.confirm_timeout_s,
                )
        self._forget_pending(item)
        await self._done(item.source)

    async def _bury_raw(self, message: AbstractIncomingMessage, why: str) -> None:
        log.error("%s; moving it to %s", why, self.topology.dead)
        await amqp.publish_until_confirmed(
            self._exchanges.dead, "", message.body, headers={amqp.REASON_HEADER: "undecodable"}
        )
        await self._settle(message)

    def _remember(self, table: OrderedDict[Any, Pending | None], key: Any, item: Pending) -> None:
        table[key] = item
        if len(table) > self.settings.remember_requeues:
            table.popitem(last=False)

    async def _another_copy(self, known: Pending | None, source: Source) -> None:
        """A message redelivered after a reconnect (or published twice) carries something seen before."""
        if known is None:  # placed or buried already: this copy has nothing left to do
            await self._done(source)
        else:  # still waiting: the newer delivery carries it now, and the older one is settled
            older, known.source = known.source, source
            await self._done(older)

    def _forget_pending(self, item: Pending) -> None:
        """The item is placed or buried: a later copy of its message has nothing left to do."""
        if self._tasks_seen.get(item.task.task_id) is item:
            self._tasks_seen[item.task.task_id] = None
        requeued = (item.task.task_id, item.attempt - 1)
        if self._requeued.get(requeued) is item:
            self._requeued[requeued] = None

    async def _done(self, source: Source) -> None:
        source.pending -= 1
        if source.pending == 0:
            await self._settle(source.message)

    @staticmethod
    async def _settle(message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as err:
            log.debug("could not ack %s (the broker redelivers it): %s", message.message_id, err)

    async def _forget_silent(self) -> None:
        stale = self.settings.dispatcher_stale_after.total_seconds()
        while True:
            await asyncio.sleep(min(1.0, stale / 2))
            for dispatcher_id in self.pool.forget_silent(self.clock(), stale):
                log.warning("dispatcher %s went silent; no longer assigning to it", dispatcher_id)


def _reason_of(history: list[messages_pb2.Requeue]) -> Reason:
    if not history:
        return Reason.LEASE_EXPIRED
    try:
        return Reason(history[-1].reason)
    except ValueError:
        return Reason.LEASE_EXPIRED
