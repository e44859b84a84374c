"""A passive witness on the broker: durable queues bound beside the real ones, seeing every requeue, dead letter and result.

Its queues are quorum queues, so a connection kill or a broker restart loses nothing it was
meant to see; it deduplicates by AMQP message id, since its own deliveries are at-least-once too.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from sluicegate import amqp
from sluicegate.v1 import messages_pb2

from .ledger import Ledger

log = logging.getLogger(__name__)


class Observer:
    def __init__(self, url: str, topology: amqp.Topology, ledger: Ledger) -> None:
        self.url = url
        self.topology = topology
        self.ledger = ledger
        self.connection: AbstractRobustConnection | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()

    @property
    def queues(self) -> list[str]:
        p = self.topology.prefix
        return [f"{p}.chaos.requeues", f"{p}.chaos.dead", f"{p}.chaos.results"]

    async def start(self) -> None:
        self.connection = await amqp.connect(self.url, deadline=30)
        channel = await self.connection.channel()
        exchanges = await amqp.Exchanges(self.topology).declare(channel)
        await channel.set_qos(prefetch_count=2000)
        bindings = [
            (exchanges.requeue, "", self._on_requeue),
            (exchanges.dead, "", self._on_dead),
            (exchanges.events, "result.*", self._on_result),
        ]
        for name, (exchange, key, handler) in zip(self.queues, bindings, strict=True):
            queue = await channel.declare_queue(name, durable=True, arguments=amqp.quorum())
            await queue.bind(exchange, routing_key=key)
            await queue.consume(handler)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()

    def _first_time(self, message: AbstractIncomingMessage) -> bool:
        key = message.message_id or ""
        if not key or key in self._seen:
            return not key
        self._seen[key] = None
        return True

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            await message.ack()

    async def _on_requeue(self, message: AbstractIncomingMessage) -> None:
        if self._first_time(message):
            headers = message.headers or {}
            reason = headers.get(amqp.REASON_HEADER)
            if reason is None:  # dead-lettered by the broker itself
                deaths = headers.get("x-death")
                raw = deaths[0].get("reason") if isinstance(deaths, list) and deaths else b"expired"
                reason = "broker_" + (raw.decode() if isinstance(raw, bytes) else str(raw))
            elif isinstance(reason, bytes):
                reason = reason.decode()
            for assignment in messages_pb2.AssignmentBatch.FromString(message.body).assignments:
                self.ledger.on_requeue(assignment, str(reason))
        await self._ack(message)

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        if self._first_time(message):
            with contextlib.suppress(Exception):
                for dead in messages_pb2.DeadLetterBatch.FromString(message.body).dead:
                    self.ledger.on_dead(dead)
        await self._ack(message)

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        if self._first_time(message):
            for result in messages_pb2.TaskResultBatch.FromString(message.body).results:
                self.ledger.on_result(result)
        await self._ack(message)

    async def delete(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        for name in self.queues:
            try:
                await channel.queue_delete(name)
            except aiormq.exceptions.AMQPError:
                channel = await connection.channel()
        await channel.close()
