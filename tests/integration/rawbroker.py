"""A test's own connection to the broker: publishes what no client says (assignments, raw tasks) and
watches what goes by."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from sluicegate import amqp
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

from .conftest import Stack


class Broker:
    """A test's own connection: publishes what the client cannot yet say, and watches queues."""

    def __init__(self, stack: Stack, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        self.stack, self.connection = stack, connection
        self.topology = amqp.Topology(stack.broker.prefix)
        self.exchanges = amqp.Exchanges(self.topology)
        self._queues: list[AbstractQueue] = []

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.exchanges.declare(channel)

    async def submit(self, *tasks: messages_pb2.Task) -> None:
        body = messages_pb2.TaskBatch(tasks=tasks).SerializeToString()
        await amqp.publish(self.exchanges.tasks, self.topology.tasks, body)

    async def assign(self, dispatcher_id: str, *assignments: messages_pb2.Assignment) -> None:
        body = messages_pb2.AssignmentBatch(assignments=assignments).SerializeToString()
        await amqp.publish(self.exchanges.assign, dispatcher_id, body)

    async def watch(self, exchange: str, routing_key: str = "") -> list[AbstractIncomingMessage]:
        """Every message published to `exchange` from now on (a private queue bound beside the real ones)."""
        channel = await self.connection.channel()
        queue = await channel.declare_queue(f"{self.topology.prefix}.test.{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(exchange, routing_key=routing_key)
        self._queues.append(queue)
        seen: list[AbstractIncomingMessage] = []

        async def keep(message: AbstractIncomingMessage) -> None:
            await message.ack()
            seen.append(message)

        await queue.consume(keep)
        return seen

    async def drain_dead(self) -> list[AbstractIncomingMessage]:
        """What the dead queue holds now (taken off it)."""
        channel = await self.connection.channel()
        queue = await channel.get_queue(self.topology.dead, ensure=False)
        taken = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await message.ack()
            taken.append(message)
        return taken


@contextlib.asynccontextmanager
async def broker_for(stack: Stack) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        broker = Broker(stack, connection)
        await broker.start()
        yield broker


def task(action: str, reply_to: str, **fields: object) -> messages_pb2.Task:
    return messages_pb2.Task(
        task_id=uuid.uuid4().hex,
        tenant="default",
        action=action,
        reply_to=reply_to,
        submitted_at_ms=now_ms(),
        **fields,  # type: ignore[arg-type]
    )
