"""Helpers of the task-store tests: a migrated store, a running recorder, events published as roles do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import aio_pika
import asyncpg

from sluicegate import amqp
from sluicegate.lifecycle import K, LifecycleEmitter, assignment_event, task_event
from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, schema
from sluicegate.v1 import messages_pb2
from sluicegate_recorder.app import Recorder
from sluicegate_recorder.settings import RecorderSettings


async def migrate(url: str) -> StoreSettings:
    connection = await asyncpg.connect(url)
    try:
        await schema.migrate(connection)
    finally:
        await connection.close()
    return StoreSettings(url=url)


async def fetchval(url: str, query: str, *args: Any) -> Any:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def execute(url: str, query: str, *args: Any) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(query, *args)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def recorder(store: StoreSettings, broker: BrokerSettings, **settings: Any) -> AsyncIterator[Recorder]:
    settings.setdefault("shutdown_grace", "2s")
    settings.setdefault("retry_max_backoff", "200ms")
    async with Recorder(RecorderSettings(**settings), store, broker) as running:
        yield running


@contextlib.asynccontextmanager
async def lifecycle_topology(broker: BrokerSettings) -> AsyncIterator[None]:
    """Deletes the lifecycle queue and the exchanges of the test's prefix afterwards."""
    try:
        yield
    finally:
        connection = await aio_pika.connect_robust(broker.url)
        async with connection:
            await amqp.delete_topology(connection, amqp.Topology(broker.prefix), [])


async def declare_queue(broker: BrokerSettings) -> None:
    """What `sluicegate migrate` declares: events published from now on are kept for the recorder."""
    connection = await aio_pika.connect_robust(broker.url)
    async with connection:
        await amqp.declare_lifecycle_queue(await connection.channel(), amqp.Topology(broker.prefix))


async def queue_depth(broker: BrokerSettings) -> int:
    connection = await aio_pika.connect_robust(broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(amqp.Topology(broker.prefix).lifecycle, passive=True)
        return queue.declaration_result.message_count or 0


class Publisher:
    """Publishes lifecycle events the way a role does, through a LifecycleEmitter."""

    def __init__(self, broker: BrokerSettings, source: str = "test") -> None:
        self.broker = broker
        self.emitter = LifecycleEmitter(amqp.Topology(broker.prefix), source)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._loop: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        self._connection = await aio_pika.connect_robust(self.broker.url)
        channel = await self._connection.channel(publisher_confirms=True)
        events = amqp.Topology(self.broker.prefix).events
        self._exchange = await amqp.declare_exchange(channel, events, aio_pika.ExchangeType.TOPIC)
        self._loop = asyncio.create_task(self.emitter.run(self._exchange))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.emitter.drain(10)
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._connection is not None:
            await self._connection.close()

    async def emit(self, events: Iterable[messages_pb2.LifecycleEvent]) -> None:
        for event in events:
            self.emitter.emit(event)
        assert await self.emitter.drain(10)

    async def publish_raw(self, events: Sequence[messages_pb2.LifecycleEvent], *, copies: int = 1) -> None:
        """The same batch as several messages: what retries after lost confirms produce."""
        assert self._exchange is not None
        body = messages_pb2.LifecycleBatch(events=events).SerializeToString()
        for _ in range(copies):
            await amqp.publish(self._exchange, "lifecycle.test", body, mandatory=True)


def task(n: int | str, *, action: str = "echo", tenant: str = "acme") -> messages_pb2.Task:
    return messages_pb2.Task(
        task_id=f"task-{n}", tenant=tenant, action=action, payload=b"payload", submitted_at_ms=1_700_000_000_000
    )


def story(n: int | str, *, at_ms: int = 1_700_000_000_000, **task_fields: Any) -> list[messages_pb2.LifecycleEvent]:
    """Every event of one task that completes on its first attempt."""
    t = task(n, **task_fields)
    a = messages_pb2.Assignment(task=t, attempt=1, worker_id="w1", dispatcher_id="d1")
    return [
        task_event(K.KIND_SUBMITTED, t, include_task=True, at_ms=at_ms + 1),
        assignment_event(K.KIND_ASSIGNED, a, at_ms=at_ms + 2),
        assignment_event(K.KIND_STARTED, a, at_ms=at_ms + 3),
        assignment_event(K.KIND_COMPLETED, a, output=f"out-{n}".encode(), at_ms=at_ms + 4),
    ]


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run the `sluicegate` command in a subprocess; returns (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluicegate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
