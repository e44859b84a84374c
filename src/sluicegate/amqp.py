"""The AMQP shell every role shares: topology names and declarations, connecting, confirmed publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)

from sluicegate.errors import PublishError, Unroutable
from sluicegate.settings import BrokerSettings

log = logging.getLogger(__name__)

REASON_HEADER = "x-sluicegate-reason"
MARKER_HEADER = "x-sluicegate-marker"  # a scheduler's own marker on an intake queue, not a task batch
CONTENT_TYPE = "application/x-protobuf"
# Rungs of the scheduler's delay ladder in milliseconds: 100 ms doubling up to about 12 days.
DELAY_RUNGS_MS: tuple[int, ...] = tuple(100 * 2**i for i in range(24))


class Delivery:
    """One consumed message and how many of the items it carries have not found their fate yet.

    Every consumer that takes a batch settles the message once, when the last item is done: a
    batch never acks earlier than its items one by one would.
    """

    __slots__ = ("message", "pending")

    def __init__(self, message: Any, pending: int) -> None:
        self.message = message
        self.pending = pending

    def done(self, count: int = 1) -> bool:
        """Count items as done; True exactly once, when none is left."""
        before = self.pending
        self.pending -= count
        return before > 0 and self.pending <= 0


@dataclass(frozen=True, slots=True)
class Topology:
    """Names of every exchange and queue, all under one prefix (DESIGN: RabbitMQ topology)."""

    prefix: str

    @property
    def tasks(self) -> str:
        """The exchange clients submit to (routing key: tenant), and the intake of tenants without their own."""
        return f"{self.prefix}.tasks"

    @property
    def unrouted(self) -> str:
        """Alternate exchange of `tasks`: a tenant with no intake of its own lands in the `tasks` queue."""
        return f"{self.prefix}.tasks.unrouted"

    def intake(self, tenant: str) -> str:
        return f"{self.prefix}.intake.{tenant}"

    @property
    def registry(self) -> str:
        """Where the scheduler records the lanes and intakes it created, to find them again after a restart."""
        return f"{self.prefix}.scheduler.registry"

    @property
    def leader(self) -> str:
        """Single-active-consumer queue whose lock message marks the one scheduler that schedules."""
        return f"{self.prefix}.scheduler.leader"

    @property
    def due(self) -> str:
        """Exchange and queue where delayed tasks arrive when their wait is over."""
        return f"{self.prefix}.due"

    def delay(self, millis: int) -> str:
        return f"{self.prefix}.delay.{millis}ms"

    @property
    def lane_prefix(self) -> str:
        return f"{self.prefix}.lane."

    @property
    def assign(self) -> str:
        return f"{self.prefix}.assign"

    @property
    def requeue(self) -> str:
        return f"{self.prefix}.requeue"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def lifecycle(self) -> str:
        """The recorder's queue of lifecycle events (bound to `events` with `lifecycle.#`)."""
        return f"{self.prefix}.lifecycle"

    def inbox(self, dispatcher_id: str) -> str:
        return f"{self.prefix}.dispatcher.{dispatcher_id}"

    def control_queue(self, dispatcher_id: str) -> str:
        return f"{self.prefix}.control.{dispatcher_id}"

    def scheduler_state_queue(self, instance_id: str) -> str:
        return f"{self.prefix}.scheduler.state.{instance_id}"

    def results_queue(self, client_id: str) -> str:
        return f"{self.prefix}.results.{client_id}"

    @staticmethod
    def result_key(reply_to: str) -> str:
        return f"result.{reply_to}"

    @staticmethod
    def state_key(dispatcher_id: str) -> str:
        return f"state.{dispatcher_id}"

    @staticmethod
    def lifecycle_key(source: str) -> str:
        return f"lifecycle.{source}"


def quorum(**extra: Any) -> dict[str, Any]:
    """Arguments of a quorum queue; at-least-once dead-lettering needs reject-publish overflow."""
    return {"x-queue-type": "quorum", **extra}


async def declare_exchange(channel: AbstractChannel, name: str, kind: aio_pika.ExchangeType) -> AbstractExchange:
    return await channel.declare_exchange(name, kind, durable=True)


async def declare_bound_queue(
    channel: AbstractChannel,
    exchange: AbstractExchange,
    name: str,
    arguments: dict[str, Any],
    routing_key: str = "",
    *,
    durable: bool = True,
    exclusive: bool = False,
    auto_delete: bool = False,
) -> AbstractQueue:
    queue = await channel.declare_queue(
        name, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=arguments
    )
    await queue.bind(exchange, routing_key=routing_key or name)
    return queue


class Exchanges:
    """Declares (idempotently) and holds every exchange of the topology on one channel."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.tasks: AbstractExchange
        self.unrouted: AbstractExchange
        self.assign: AbstractExchange
        self.requeue: AbstractExchange
        self.events: AbstractExchange
        self.dead: AbstractExchange
        self.control: AbstractExchange

    async def declare(self, channel: AbstractChannel) -> Exchanges:
        t = self.topology
        direct, fanout, topic = (
            aio_pika.ExchangeType.DIRECT,
            aio_pika.ExchangeType.FANOUT,
            aio_pika.ExchangeType.TOPIC,
        )
        self.unrouted = await declare_exchange(channel, t.unrouted, fanout)
        self.tasks = await channel.declare_exchange(
            t.tasks, direct, durable=True, arguments={"alternate-exchange": t.unrouted}
        )
        self.assign = await declare_exchange(channel, t.assign, direct)
        self.requeue = await declare_exchange(channel, t.requeue, fanout)
        self.events = await declare_exchange(channel, t.events, topic)
        self.dead = await declare_exchange(channel, t.dead, fanout)
        self.control = await declare_exchange(channel, t.control, fanout)
        # The durable queues that must exist before anything is published to them, so that a
        # submit before the scheduler ever ran is kept, not returned.
        await declare_bound_queue(channel, self.unrouted, t.tasks, quorum(**{"x-single-active-consumer": True}))
        await declare_bound_queue(channel, self.requeue, t.requeue, quorum(**{"x-single-active-consumer": True}))
        await declare_bound_queue(channel, self.dead, t.dead, quorum())
        return self


async def declare_lifecycle_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The recorder's durable queue: every lifecycle event waits here while no recorder runs.

    Declared by the recorder and by `sluicegate migrate`, so that events are kept from the moment a
    store is set up, even before the first recorder starts.
    """
    events = await declare_exchange(channel, topology.events, aio_pika.ExchangeType.TOPIC)
    return await declare_bound_queue(channel, events, topology.lifecycle, quorum(), routing_key="lifecycle.#")


def inbox_arguments(topology: Topology, ttl: timedelta, expires: timedelta) -> dict[str, Any]:
    """A dispatcher's inbox: what is not settled within its TTL dead-letters to `requeue`."""
    return quorum(
        **{
            "x-dead-letter-exchange": topology.requeue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-message-ttl": int(ttl.total_seconds() * 1000),
            "x-expires": int(expires.total_seconds() * 1000),
        }
    )


async def _connect_with_retries(open_: Any, url: str, deadline: float) -> Any:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    delay = 0.1
    while True:
        try:
            return await open_(url, timeout=5)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPConnectionError) as err:
            if loop.time() + delay > give_up:
                raise PublishError("cannot reach the broker") from err
            log.warning("broker not reachable yet, retrying in %.1fs", delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


async def connect(url: str, *, deadline: float = 30.0) -> AbstractRobustConnection:
    """Connect robustly, retrying the first connect (which connect_robust does not) until `deadline`."""
    connection: AbstractRobustConnection = await _connect_with_retries(aio_pika.connect_robust, url, deadline)
    return connection


async def connect_plain(url: str, *, deadline: float = 30.0) -> AbstractConnection:
    """A connection that stays closed when it closes: for a process that rebuilds its state per connection."""
    connection: AbstractConnection = await _connect_with_retries(aio_pika.connect, url, deadline)
    return connection


def with_heartbeat(url: str, seconds: int) -> str:
    """The URL with an AMQP heartbeat, unless it names one: a hung peer is dropped after about three."""
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={seconds}"


async def connect_broker(broker: BrokerSettings) -> AbstractRobustConnection:
    """Connect to the broker the settings name, retrying for as long as they allow."""
    return await connect(broker.url, deadline=broker.connect_deadline.total_seconds())


async def publish(
    exchange: AbstractExchange,
    routing_key: str,
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    mandatory: bool = True,
    timeout: float = 10.0,
    persistent: bool = True,
    message_id: str | None = None,
) -> None:
    """Publish and wait for the broker's confirm.

    Raises Unroutable when a mandatory publish is returned, PublishError when it is nacked, not
    confirmed in time, or the channel is lost. Nothing is ever dropped silently.
    """
    message = aio_pika.Message(
        body,
        headers=dict(headers) if headers else None,
        content_type=CONTENT_TYPE,
        message_id=message_id or uuid.uuid4().hex,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )
    try:
        await exchange.publish(message, routing_key, mandatory=mandatory, timeout=timeout)
    except asyncio.CancelledError as err:
        # aiormq cancels the confirm it awaits when it drops a connection (one whose heartbeats
        # stopped, say): a lost confirm, which must not end the caller's loop as a cancellation
        # would. Only a cancellation of the calling task itself goes on as one.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise PublishError(f"publish to {exchange.name!r} was not confirmed: the connection was lost") from err
    except aiormq.exceptions.PublishError as err:
        raise Unroutable(f"no queue bound for {exchange.name!r} / {routing_key!r}") from err
    except (
        TimeoutError,
        aiormq.exceptions.DeliveryError,
        aiormq.exceptions.AMQPError,
        ConnectionError,
        RuntimeError,
    ) as err:
        raise PublishError(f"publish to {exchange.name!r} was not confirmed") from err


async def publish_until_confirmed(
    exchange: AbstractExchange,
    routing_key: str,
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    mandatory: bool = True,
    timeout: float = 10.0,
    message_id: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Retry a publish across connection loss until the broker confirms it.

    A retry after a lost confirm can duplicate the message; receivers deduplicate by id.
    Unroutable is permanent and is raised at once.
    """
    delay = 0.05
    message_id = message_id or uuid.uuid4().hex
    while True:
        try:
            await publish(
                exchange,
                routing_key,
                body,
                headers=headers,
                mandatory=mandatory,
                timeout=timeout,
                message_id=message_id,
            )
            return
        except PublishError:
            if stop is not None and stop.is_set():
                raise
            log.warning("publish to %s not confirmed; retrying in %.2fs", exchange.name, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


async def recorded_queues(connection: AbstractRobustConnection, topology: Topology) -> list[str]:
    """The lanes and intakes the scheduler's registry names (read, then put back); empty if it has none."""
    from google.protobuf.message import DecodeError

    from sluicegate.v1 import messages_pb2

    channel = await connection.channel()
    names: set[str] = set()
    try:
        queue = await channel.declare_queue(topology.registry, passive=True)
        got = []
        while (message := await queue.get(fail=False, timeout=10)) is not None:
            got.append(message)
            with contextlib.suppress(DecodeError):
                names.update(r.queue for r in messages_pb2.LaneRecordBatch.FromString(message.body).records)
        for message in got:
            await message.nack(requeue=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return []
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return sorted(names)


async def delete_topology(connection: AbstractRobustConnection, topology: Topology, dispatcher_ids: list[str]) -> None:
    """Delete every queue and exchange under the topology's prefix (tests and the demo clean up)."""
    queues = await recorded_queues(connection, topology)
    channel = await connection.channel()
    queues += [topology.tasks, topology.requeue, topology.dead, topology.due, topology.registry, topology.leader]
    queues += [topology.lifecycle, *(topology.delay(ms) for ms in DELAY_RUNGS_MS)]
    queues += [topology.inbox(d) for d in dispatcher_ids] + [topology.control_queue(d) for d in dispatcher_ids]
    for name in queues:
        try:
            await channel.queue_delete(name)
        except aiormq.exceptions.AMQPError:
            channel = await connection.channel()  # a failed delete closes the channel
    exchanges = (topology.tasks, topology.unrouted, topology.assign, topology.requeue, topology.events)
    for name in (*exchanges, topology.dead, topology.control, topology.due):
        try:
            await channel.exchange_delete(name)
        except aiormq.exceptions.AMQPError:
            channel = await connection.channel()
    await channel.close()
