"""The producer's client: submit tasks (confirmed by the broker), await their results, look up any task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from google.protobuf.message import DecodeError
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, telemetry
from sluicegate.batching import GroupCommit
from sluicegate.errors import BrokerRefused, InvalidInput, TaskFailed, TaskPending
from sluicegate.retry import RetryPolicy
from sluicegate.retry import stamp as stamp_retry
from sluicegate.settings import BrokerSettings, load
from sluicegate.store import StoreSettings, TaskRecord, TaskStore
from sluicegate.v1 import messages_pb2
from sluicegate.validation import DEFAULT_MAX_PAYLOAD, check_task
from sluicegate.wire import now_ms

TaskResult = messages_pb2.TaskResult
RESULTS_QUEUE_EXPIRES_MS = 10 * 60 * 1000
# Between unbinding the results queue and deleting it: a publish routed to it just before the
# unbind is delivered within milliseconds, and must reach a queue that still exists.
UNBOUND_GRACE_S = 0.25
COMPLETED = messages_pb2.TASK_STATUS_COMPLETED
BATCH_BYTES = 256 * 1024  # a submit message carries tasks up to this many bytes (one at least)
Seconds = float | timedelta


@dataclass(slots=True)
class TaskSpec:
    """One task to submit.

    `delay` / `run_at`: not assigned before then (durable, across scheduler restarts).
    `schedule_timeout`: not started within it after submission, the task ends EXPIRED and never runs.
    `fairness_key`: tasks of one tenant share workers by weight across keys. `concurrency_key`: the
    scheduler's limits cap running tasks per key. `sticky_key`: tasks with one key go to the same worker
    while it lives. `preferred`: soft affinity, {"label=value": weight}. `retry`: retries and their
    backoff (`max_retries` alone keeps the default backoff); unset, the worker's default for the action.
    `partition_key`: with several scheduler partitions, which one schedules the task is a hash of this
    key instead of the tenant (a tenant too big for one scheduler spreads over several).
    """

    action: str
    payload: bytes | str | dict[str, Any] | list[Any] | None = None
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 0.0
    max_retries: int | None = None
    tenant: str = "default"
    task_id: str = ""
    delay: Seconds | None = None
    run_at: datetime | float | None = None
    schedule_timeout: Seconds | None = None
    fairness_key: str = ""
    concurrency_key: str = ""
    sticky_key: str = ""
    preferred: Mapping[str, int] = field(default_factory=dict)
    retry: RetryPolicy | None = None
    partition_key: str = ""


def _seconds(value: Seconds | None, what: str) -> float:
    if value is None:
        return 0.0
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 <= seconds <= 7 * 24 * 3600:
        raise InvalidInput(f"{what} must be between 0 and 7 days")
    return seconds


def _run_at_ms(spec: TaskSpec, now: int) -> int:
    if spec.delay is not None and spec.run_at is not None:
        raise InvalidInput("give delay or run_at, not both")
    if spec.delay is not None:
        return now + round(_seconds(spec.delay, "delay") * 1000)
    if spec.run_at is None:
        return 0
    at = spec.run_at.timestamp() if isinstance(spec.run_at, datetime) else float(spec.run_at)
    return max(now, round(at * 1000))


def _preferred(preferred: Mapping[str, int]) -> list[messages_pb2.LabelPreference]:
    out = []
    for label, weight in preferred.items():
        key, sep, value = label.partition("=")
        if not sep:
            raise InvalidInput(f"preferred label {label[:40]!r} must look like key=value")
        out.append(messages_pb2.LabelPreference(key=key, value=value, weight=int(weight)))
    return out


def _payload_bytes(payload: bytes | str | dict[str, Any] | list[Any] | None) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload).encode()


class Client:
    """Submits tasks and collects their results, which are routed back to this client only.

    `submit` returns once the broker has confirmed the task is in the durable `tasks` queue.
    A result that arrives twice (an at-least-once duplicate) is counted in `duplicates` and the
    first one is kept. With a task store (`store`, else SLUICEGATE_STORE_URL), `get` looks up any
    task's record and `result` finds the results of tasks this client did not submit.
    """

    def __init__(
        self,
        broker: BrokerSettings | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        store: StoreSettings | None = None,
    ) -> None:
        self.broker = broker or BrokerSettings()
        self.store_settings = store if store is not None else load(StoreSettings)
        self._store: TaskStore | None = None
        self._consumer_tag: str | None = None
        self._submitted: set[str] = set()
        self.topology = amqp.Topology(self.broker.prefix)
        self.client_id = uuid.uuid4().hex
        self.max_payload = max_payload
        self.duplicates = 0
        self.untrusted = 0  # results dropped: not published by a trusted broker user
        self._results: dict[str, TaskResult] = {}
        self._messages_seen: OrderedDict[str, None] = OrderedDict()  # redeliveries are not duplicates
        self._waiters: dict[str, asyncio.Future[TaskResult]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._tasks: AbstractExchange | None = None
        self._partition_tasks: list[AbstractExchange] = []
        self._default: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._batcher = GroupCommit(self._publish_batch, max_items=100, max_bytes=BATCH_BYTES, size=_task_size)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        self._connection = await amqp.connect_broker(self.broker)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # With partitions, each has a `tasks` exchange of its own; a tenant's tasks go to its partition's.
        self._partition_tasks = [
            await self._declare(channel, self.topology.of_partition(k)) for k in range(self.broker.partitions)
        ]
        self._tasks = self._partition_tasks[0]
        self._default = channel.default_exchange
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=1000)
        # Durable and not exclusive, so results published while the connection is being restored
        # (or the broker restarts) wait for us; it expires once no client has used it for a while.
        # A quorum queue, so that in a cluster it outlives the node it was declared on: a classic
        # queue lives on one node, and results routed to it while that node is down are dropped.
        self._queue = await consume_channel.declare_queue(
            self.topology.results_queue(self.client_id),
            durable=True,
            arguments=amqp.quorum(**{"x-expires": RESULTS_QUEUE_EXPIRES_MS}),
        )
        await self._queue.bind(self.topology.events, routing_key=self.topology.result_key(self.client_id))
        self._consumer_tag = await self._queue.consume(self._on_result)

    async def close(self) -> None:
        await self._batcher.close()
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._queue is not None:
            with contextlib.suppress(Exception):
                await self._leave_results_queue(self._queue)
            self._consumer_tag = None
            self._queue = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.cancel()

    async def _declare(self, channel: AbstractChannel, topology: amqp.Topology) -> AbstractExchange:
        """A partition's exchanges, and its `tasks` queue where no scheduler (or client) made it yet.

        The queue is bound only where it is missing: with the client's broker user (which may not
        read `tasks.unrouted`, see deploy/rabbitmq/definitions.json) that fails, and the client
        says to start a scheduler first; a user with every right makes it, and a submit before
        any scheduler ran is kept.
        """
        assert self._connection is not None
        exists = await amqp.queue_exists(self._connection, topology.tasks)
        try:
            return (await amqp.Exchanges(topology).declare(channel, service_queues=False, tasks_queue=not exists)).tasks
        except aiormq.exceptions.ChannelAccessRefused:
            if not exists:  # declared, then refused the binding: leave no unbound queue behind
                with contextlib.suppress(Exception):
                    cleanup = await self._connection.channel()
                    await cleanup.queue_delete(topology.tasks)
                    await cleanup.close()
            raise BrokerRefused(
                f"the broker has no queue {topology.tasks!r} yet and this user may not make it: "
                "start a scheduler first (it declares the task queues)"
            ) from None

    async def _leave_results_queue(self, queue: AbstractQueue) -> None:
        """Stop consuming, unbind, let results already routed here land, then delete the queue.

        RabbitMQ closes a publisher's whole connection (541 INTERNAL_ERROR) when one of its channels
        delivers to a quorum queue that is being deleted: deleting this queue while a dispatcher
        still publishes results to it would cost that dispatcher its broker connection, and every
        worker its work until it reconnects. Once unbound, no new result is routed here.
        """
        if self._consumer_tag is not None:  # first: a deleted queue's consumer is cancelled noisily
            await queue.cancel(self._consumer_tag)
        await queue.unbind(self.topology.events, routing_key=self.topology.result_key(self.client_id))
        if self._submitted - self._results.keys():  # results may be on their way
            await asyncio.sleep(UNBOUND_GRACE_S)
        await queue.delete(if_unused=False, if_empty=False)

    def _build(self, spec: TaskSpec) -> tuple[messages_pb2.Task, Span]:
        if not 0 <= spec.timeout_s <= 7 * 24 * 3600:
            raise InvalidInput("timeout must be between 0 and 7 days")
        if len(spec.partition_key) > 256:
            raise InvalidInput("partition_key must be at most 256 characters")
        if (spec.max_retries is not None and spec.max_retries < 0) or spec.priority < 0:
            raise InvalidInput("priority and max_retries must not be negative")
        now = now_ms()
        task = messages_pb2.Task(
            task_id=spec.task_id or uuid.uuid4().hex,
            tenant=spec.tenant,
            action=spec.action,
            payload=_payload_bytes(spec.payload),
            priority=spec.priority,
            labels=spec.labels,
            timeout_ms=int(spec.timeout_s * 1000),
            reply_to=self.client_id,
            submitted_at_ms=now,
            run_at_ms=_run_at_ms(spec, now),
            schedule_timeout_ms=round(_seconds(spec.schedule_timeout, "schedule_timeout") * 1000),
            fairness_key=spec.fairness_key,
            concurrency_key=spec.concurrency_key,
            sticky_key=spec.sticky_key,
            preferred=_preferred(spec.preferred),
        )
        if spec.retry is not None:
            stamp_retry(task, spec.retry)
        if spec.max_retries is not None:
            task.max_retries = spec.max_retries
        check_task(task, self.max_payload)
        span = telemetry.start(
            f"submit {task.action}",
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                task.task_id,
                None,
                **{
                    "messaging.destination.name": self.topology.tasks,
                    "messaging.operation.type": "publish",
                    "sluicegate.tenant": task.tenant,
                },
            ),
        )
        telemetry.carry(span, task.trace)  # one trace per task, from here to its result
        return task, span

    async def submit(self, action: str, payload: Any = None, **options: Any) -> str:
        """Submit one task; returns its id once the broker confirmed it. Raises InvalidInput first if malformed.

        Submits made at the same time share a message (one publish in flight per tenant): a lone one
        goes out at once, many concurrent ones cost the broker one message per batch.
        """
        if self._tasks is None:
            raise RuntimeError("client is not connected")
        spec = TaskSpec(action=action, payload=payload, **options)
        task, span = self._build(spec)
        try:
            await self._batcher.put(f"{self._partition(spec)}:{task.tenant}", task)
        finally:
            span.end()
        self._submitted.add(task.task_id)
        return task.task_id

    def _partition(self, spec: TaskSpec) -> int:
        return amqp.partition_of(spec.tenant, self.broker.partitions, spec.partition_key)

    def _tasks_exchange(self, partition: int) -> AbstractExchange:
        """The `tasks` exchange of a scheduler partition (partition 0's is the one without partitions)."""
        if self._tasks is None:
            raise RuntimeError("client is not connected")
        return self._partition_tasks[partition] if partition else self._tasks

    async def _publish_batch(self, destination: str, tasks: list[messages_pb2.Task]) -> None:
        partition, _, tenant = destination.partition(":")
        await amqp.publish_until_confirmed(
            self._tasks_exchange(int(partition)),
            tenant,  # a tenant with an intake of its own is routed to it, others to the shared one
            messages_pb2.TaskBatch(tasks=tasks).SerializeToString(),
            timeout=self.broker.confirm_timeout_s,
        )

    async def submit_many(self, specs: Iterable[TaskSpec], *, batch_size: int = 100) -> list[str]:
        """Submit several tasks, several per AMQP message; all are validated before any is sent."""
        if self._tasks is None:
            raise RuntimeError("client is not connected")
        specs = list(specs)
        built = [self._build(spec) for spec in specs]
        tasks = [task for task, _ in built]
        partitions = [self._partition(spec) for spec in specs]
        headers: dict[str, str] = {}
        propagate.inject(headers)  # the caller's context, if any, for the message as a whole
        try:
            await asyncio.gather(
                *(
                    amqp.publish_until_confirmed(
                        self._tasks_exchange(partition),
                        tenant,  # a tenant with an intake of its own is routed to it, others to the shared one
                        messages_pb2.TaskBatch(tasks=batch).SerializeToString(),
                        headers=headers,
                        timeout=self.broker.confirm_timeout_s,
                    )
                    for (partition, tenant), batch in _batches(tasks, partitions, batch_size)
                )
            )
        finally:
            for _, span in built:
                span.end()
        self._submitted.update(t.task_id for t in tasks)
        return [t.task_id for t in tasks]

    async def resubmit(self, tasks: Iterable[messages_pb2.Task], *, batch_size: int = 100) -> list[str]:
        """Submit tasks built elsewhere (an operator's replay), as they are but for `reply_to`: this client's."""
        if self._tasks is None:
            raise RuntimeError("client is not connected")
        built = list(tasks)
        for task in built:
            task.reply_to = self.client_id
            check_task(task, self.max_payload)
        # A task does not carry its partition key: a replay goes to its tenant's partition.
        partitions = [amqp.partition_of(task.tenant, self.broker.partitions) for task in built]
        await asyncio.gather(
            *(
                amqp.publish_until_confirmed(
                    self._tasks_exchange(partition),
                    tenant,
                    messages_pb2.TaskBatch(tasks=batch).SerializeToString(),
                    timeout=self.broker.confirm_timeout_s,
                )
                for (partition, tenant), batch in _batches(built, partitions, batch_size)
            )
        )
        self._submitted.update(t.task_id for t in built)
        return [t.task_id for t in built]

    @property
    def store(self) -> TaskStore:
        """The task store this client reads (InvalidInput if none is configured)."""
        if self._store is None:
            self._store = TaskStore(self.store_settings)
        return self._store

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record from the task store (any task, from any process), or None if it has none.

        Raises InvalidInput without a store, StoreUnavailable when it cannot be reached.
        """
        return await self.store.get(task_id)

    async def cancel(
        self, task_id: str, reason: str = "", *, timeout: float | None = 10.0, wait: bool = True
    ) -> TaskResult | None:
        """Cancel a task wherever it is, and return its terminal result.

        A task waiting (in a lane, delayed, queued at a dispatcher) never runs; a running one is
        stopped on its worker (its handler is cancelled). The result is CANCELLED, or what the task
        ended as if it finished first ("it had already finished"). The cancellation is kept on a
        durable stream, so restarts of schedulers and dispatchers forget none. Returns None when no
        result is to be had within `timeout` (a task another client submitted, with no task store),
        and at once with `wait=False`, when the cancellation is durably recorded.
        """
        if self._default is None:
            raise RuntimeError("client is not connected")
        if not task_id or len(task_id) > 128:
            raise InvalidInput("task_id must hold 1 to 128 characters")
        cancel = messages_pb2.Cancel(task_id=task_id, reason=reason[:500], at_ms=now_ms(), requested_by=self.client_id)
        await amqp.publish_until_confirmed(
            self._default,
            self.topology.cancels,
            messages_pb2.CancelBatch(cancels=[cancel]).SerializeToString(),
            timeout=self.broker.confirm_timeout_s,
        )
        if wait and (task_id in self._results or task_id in self._submitted or self.store_settings.configured):
            try:
                return await self.result(task_id, timeout)
            except TimeoutError:
                return None
        return None

    async def result(self, task_id: str, timeout: float | None = None, *, wait: bool = True) -> TaskResult:
        """The task's terminal result (completed, failed, dead, rejected, expired or cancelled).

        A task this client submitted gets its result as it is routed back. Any other task (one
        submitted elsewhere, or before a restart) is looked up in the task store, which is polled
        until its record is terminal. With `wait=False`, TaskPending is raised at once if the
        result is not there yet. TimeoutError after `timeout` seconds.
        """
        if task_id in self._results:
            return self._results[task_id]
        if task_id not in self._submitted and self.store_settings.configured:
            if not wait:
                return (await self.store.result_now(task_id)).to_result()
            return (await self.store.wait(task_id, timeout)).to_result()
        if not wait:
            raise TaskPending(f"task {task_id} has no result yet")
        waiter = self._waiters.get(task_id)
        if waiter is None:
            waiter = self._waiters[task_id] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout):
            return await asyncio.shield(waiter)

    async def run(self, action: str, payload: Any = None, *, timeout: float | None = None, **options: Any) -> bytes:
        """Submit, wait, and return the output; raises TaskFailed unless the task completed."""
        result = await self.result(await self.submit(action, payload, **options), timeout)
        if result.status != COMPLETED:
            raise TaskFailed(result)
        return result.output

    @property
    def results(self) -> dict[str, TaskResult]:
        return self._results

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        if not amqp.trusted(message, self.broker.trusted):
            self.untrusted += 1  # a forged result: not from a dispatcher or scheduler user
            with contextlib.suppress(Exception):
                await message.ack()
            return
        redelivered = message.message_id in self._messages_seen
        try:
            batch = messages_pb2.TaskResultBatch.FromString(message.body)
        except DecodeError:
            batch = messages_pb2.TaskResultBatch()
        with contextlib.suppress(Exception):  # a delivery from before a reconnect: the broker sends it again
            await message.ack()
        if redelivered:
            return
        if message.message_id:
            self._messages_seen[message.message_id] = None
            if len(self._messages_seen) > 100_000:
                self._messages_seen.popitem(last=False)
        for result in batch.results:
            if result.task_id in self._results:
                self.duplicates += 1
                continue
            self._results[result.task_id] = result
            telemetry.start(
                "result",
                result.trace,
                kind=SpanKind.CONSUMER,
                attributes=telemetry.task_attributes(
                    result.task_id, result.attempt, **{"sluicegate.task.status": int(result.status)}
                ),
            ).end()
            waiter = self._waiters.pop(result.task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)


def _batches(
    tasks: list[messages_pb2.Task], partitions: list[int], most: int
) -> list[tuple[tuple[int, str], list[messages_pb2.Task]]]:
    """Consecutive tasks of one tenant and partition, up to `most` and BATCH_BYTES a message (bounded by bytes)."""
    batches: list[tuple[tuple[int, str], list[messages_pb2.Task]]] = []
    size = 0
    for task, partition in zip(tasks, partitions, strict=True):
        task_size = task.ByteSize()
        last = batches[-1] if batches else None
        where = (partition, task.tenant)
        if last is None or last[0] != where or len(last[1]) >= most or size + task_size > BATCH_BYTES:
            batches.append((where, [task]))
            size = task_size
        else:
            last[1].append(task)
            size += task_size
    return batches


def _task_size(task: messages_pb2.Task) -> int:
    return task.ByteSize()
