"""The producer's client: submit tasks (confirmed by the broker) and await their results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, telemetry
from sluicegate.errors import InvalidInput, TaskFailed
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate.validation import DEFAULT_MAX_PAYLOAD, check_task
from sluicegate.wire import now_ms

TaskResult = messages_pb2.TaskResult
RESULTS_QUEUE_EXPIRES_MS = 10 * 60 * 1000
COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


@dataclass(slots=True)
class TaskSpec:
    """One task to submit."""

    action: str
    payload: bytes | str | dict[str, Any] | list[Any] | None = None
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 0.0
    max_retries: int = 0
    tenant: str = "default"
    task_id: str = ""


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
    first one is kept.
    """

    def __init__(self, broker: BrokerSettings | None = None, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.broker = broker or BrokerSettings()
        self.topology = amqp.Topology(self.broker.prefix)
        self.client_id = uuid.uuid4().hex
        self.max_payload = max_payload
        self.duplicates = 0
        self._results: dict[str, TaskResult] = {}
        self._messages_seen: OrderedDict[str, None] = OrderedDict()  # redeliveries are not duplicates
        self._waiters: dict[str, asyncio.Future[TaskResult]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._tasks: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None

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
        exchanges = await amqp.Exchanges(self.topology).declare(channel)
        self._tasks = exchanges.tasks
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
        await self._queue.consume(self._on_result)

    async def close(self) -> None:
        if self._queue is not None:
            with contextlib.suppress(Exception):
                await self._queue.delete(if_unused=False, if_empty=False)
            self._queue = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.cancel()

    def _build(self, spec: TaskSpec) -> tuple[messages_pb2.Task, Span]:
        if not 0 <= spec.timeout_s <= 7 * 24 * 3600:
            raise InvalidInput("timeout must be between 0 and 7 days")
        if spec.max_retries < 0 or spec.priority < 0:
            raise InvalidInput("priority and max_retries must not be negative")
        task = messages_pb2.Task(
            task_id=spec.task_id or uuid.uuid4().hex,
            tenant=spec.tenant,
            action=spec.action,
            payload=_payload_bytes(spec.payload),
            priority=spec.priority,
            labels=spec.labels,
            timeout_ms=int(spec.timeout_s * 1000),
            max_retries=spec.max_retries,
            reply_to=self.client_id,
            submitted_at_ms=now_ms(),
        )
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
        """Submit one task; returns its id once the broker confirmed it. Raises InvalidInput first if malformed."""
        (task_id,) = await self.submit_many([TaskSpec(action=action, payload=payload, **options)])
        return task_id

    async def submit_many(self, specs: Iterable[TaskSpec], *, batch_size: int = 100) -> list[str]:
        """Submit several tasks, several per AMQP message; all are validated before any is sent."""
        if self._tasks is None:
            raise RuntimeError("client is not connected")
        built = [self._build(spec) for spec in specs]
        tasks = [task for task, _ in built]
        batches = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]
        headers: dict[str, str] = {}
        propagate.inject(headers)  # the caller's context, if any, for the message as a whole
        try:
            await asyncio.gather(
                *(
                    amqp.publish_until_confirmed(
                        self._tasks,
                        self.topology.tasks,
                        messages_pb2.TaskBatch(tasks=batch).SerializeToString(),
                        headers=headers,
                        timeout=self.broker.confirm_timeout_s,
                    )
                    for batch in batches
                )
            )
        finally:
            for _, span in built:
                span.end()
        return [t.task_id for t in tasks]

    async def result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """The task's terminal result (completed, failed, dead or rejected)."""
        if task_id in self._results:
            return self._results[task_id]
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
