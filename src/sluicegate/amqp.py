"""The AMQP shell every role shares: topology names and declarations, connecting, confirmed publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from sluicegate.errors import PublishError, Unroutable
from sluicegate.failover import FailoverConnection
from sluicegate.refusals import REFUSALS, refused
from sluicegate.settings import BrokerSettings, split_urls

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


def partition_of(tenant: str, partitions: int, key: str = "") -> int:
    """The scheduler partition of a task: a stable hash (CRC-32) of its tenant, or of its partition key.

    Every client computes the same answer, so without partition keys a tenant's tasks, lanes,
    limits and fairness all live in one partition. A partition key spreads one tenant too big for
    one scheduler over several (its workers are then shared between partitions).
    """
    return 0 if partitions <= 1 else zlib.crc32((f"key:{key}" if key else tenant).encode()) % partitions


@dataclass(frozen=True, slots=True)
class Topology:
    """Names of every exchange and queue, all under one prefix (DESIGN: RabbitMQ topology).

    A scheduler partition other than 0 has its own copy of the scheduler's names (intakes, lanes,
    delays, registry, lead, requeue) under `<prefix>.p<N>`; what dispatchers, clients and the
    recorder share (assign, events, dead, control, cancels) keeps the plain prefix. Partition 0's
    names are the plain ones, so one partition is exactly the topology without partitions.
    """

    prefix: str
    partition: int = 0

    @property
    def own(self) -> str:
        """The prefix of this partition's own names."""
        return self.prefix if self.partition == 0 else f"{self.prefix}.p{self.partition}"

    def of_partition(self, partition: int) -> Topology:
        return Topology(self.prefix, partition)

    @property
    def tasks(self) -> str:
        """The exchange clients submit to (routing key: tenant), and the intake of tenants without their own."""
        return f"{self.own}.tasks"

    @property
    def unrouted(self) -> str:
        """Alternate exchange of `tasks`: a tenant with no intake of its own lands in the `tasks` queue."""
        return f"{self.own}.tasks.unrouted"

    def intake(self, tenant: str) -> str:
        return f"{self.own}.intake.{tenant}"

    @property
    def registry(self) -> str:
        """Where the scheduler records the lanes and intakes it created, to find them again after a restart."""
        return f"{self.own}.scheduler.registry"

    @property
    def leader(self) -> str:
        """Single-active-consumer queue whose lock message marks the one scheduler that schedules."""
        return f"{self.own}.scheduler.leader"

    @property
    def due(self) -> str:
        """Exchange and queue where delayed tasks arrive when their wait is over."""
        return f"{self.own}.due"

    def delay(self, millis: int) -> str:
        return f"{self.own}.delay.{millis}ms"

    @property
    def lane_prefix(self) -> str:
        return f"{self.own}.lane."

    @property
    def assign(self) -> str:
        return f"{self.prefix}.assign"

    @property
    def requeue(self) -> str:
        return f"{self.own}.requeue"

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

    @property
    def cancels(self) -> str:
        """The stream of cancellations every scheduler and dispatcher replays when it starts."""
        return f"{self.prefix}.cancels"

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


async def declare_exchange(
    channel: AbstractChannel,
    name: str,
    kind: aio_pika.ExchangeType,
    *,
    restore: bool = True,
    arguments: dict[str, Any] | None = None,
) -> AbstractExchange:
    if not restore and isinstance(channel, AbstractRobustChannel):
        return await channel.declare_exchange(name, kind, durable=True, robust=False, arguments=arguments)
    return await channel.declare_exchange(name, kind, durable=True, arguments=arguments)


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
    restore: bool = True,
) -> AbstractQueue:
    """Declare a queue and bind it; `restore=False`: a robust channel does not declare it again on reconnect."""
    if not restore and isinstance(channel, AbstractRobustChannel):
        queue: AbstractQueue = await channel.declare_queue(
            name, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=arguments, robust=False
        )
    else:
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
        self.default: AbstractExchange  # the channel's default exchange: straight to a queue by its name

    async def declare(
        self, channel: AbstractChannel, *, service_queues: bool = True, tasks_queue: bool = True
    ) -> Exchanges:
        """Declare the topology once; a robust channel is not told to declare it again after a reconnect.

        Everything here is durable (and the queues replicated), so it outlives any connection;
        declaring it again on every reconnect only delays the channel's return. In a cluster
        with a node that hangs, a declaration waits for that node (a metadata write) until it
        is back or declared down, which would hold up publishing through the channel.
        """
        t = self.topology
        self.default = channel.default_exchange
        direct, fanout, topic = (
            aio_pika.ExchangeType.DIRECT,
            aio_pika.ExchangeType.FANOUT,
            aio_pika.ExchangeType.TOPIC,
        )
        self.unrouted = await declare_exchange(channel, t.unrouted, fanout, restore=False)
        self.tasks = await declare_exchange(
            channel, t.tasks, direct, restore=False, arguments={"alternate-exchange": t.unrouted}
        )
        self.assign = await declare_exchange(channel, t.assign, direct, restore=False)
        self.requeue = await declare_exchange(channel, t.requeue, fanout, restore=False)
        self.events = await declare_exchange(channel, t.events, topic, restore=False)
        self.dead = await declare_exchange(channel, t.dead, fanout, restore=False)
        self.control = await declare_exchange(channel, t.control, fanout, restore=False)
        # The durable queues that must exist before anything is published to them, so that a
        # submit before the scheduler ever ran is kept, not returned.
        # A client (`service_queues=False`) needs only the first: its broker user may not read
        # `requeue` or `dead`, which carry every tenant's tasks. Where the first exists already
        # (`tasks_queue=False`), a client does not bind it again: binding needs read on
        # `tasks.unrouted`, which would let a client bind a queue of its own there too.
        sac = quorum(**{"x-single-active-consumer": True})
        if tasks_queue:
            await declare_bound_queue(channel, self.unrouted, t.tasks, sac, restore=False)
        if service_queues:
            await declare_bound_queue(channel, self.requeue, t.requeue, sac, restore=False)
            await declare_bound_queue(channel, self.dead, t.dead, quorum(), restore=False)
        await declare_cancels(channel, t)
        return self


async def queue_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether the broker has the queue (a passive declare, on a channel of its own: a miss closes it)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return True


async def declare_lifecycle_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The recorder's durable queue: every lifecycle event waits here while no recorder runs.

    Declared by the recorder and by `sluicegate migrate`, so that events are kept from the moment a
    store is set up, even before the first recorder starts.
    """
    events = await declare_exchange(channel, topology.events, aio_pika.ExchangeType.TOPIC)
    return await declare_bound_queue(channel, events, topology.lifecycle, quorum(), routing_key="lifecycle.#")


CANCELS_RETENTION = "7D"  # a cancellation is remembered this long (the stream's x-max-age)


async def declare_cancels(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The cancellations stream: durable, replayable from its start by whoever (re)starts."""
    return await channel.declare_queue(
        topology.cancels,
        durable=True,
        arguments={"x-queue-type": "stream", "x-max-age": CANCELS_RETENTION},
    )


async def follow_cancels(
    connection: AbstractRobustConnection | AbstractConnection,
    topology: Topology,
    on_cancels: Callable[[list[Any]], None],
    catch_up: float = 10.0,
) -> None:
    """Read every cancellation the stream still holds, then each new one as it comes (until cancelled).

    Returns once what the stream held when it was called has been read (a marker of its own written
    to its end has come back), or after `catch_up` seconds: whoever then takes work knows every
    cancellation made before it started.
    """
    from sluicegate.v1 import messages_pb2

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=500)  # a stream consumer needs a prefetch
    queue = await declare_cancels(channel, topology)
    marker, caught_up = f"catch-up-{uuid.uuid4().hex}", asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if message.message_id == marker:
            caught_up.set()
        with contextlib.suppress(Exception):
            on_cancels(list(messages_pb2.CancelBatch.FromString(message.body).cancels))
        with contextlib.suppress(Exception):
            await message.ack()

    await queue.consume(on_message, arguments={"x-stream-offset": "first"})
    await channel.default_exchange.publish(aio_pika.Message(b"", message_id=marker), routing_key=topology.cancels)
    try:
        await asyncio.wait_for(caught_up.wait(), catch_up)
    except TimeoutError:
        log.warning("the cancellations stream was not read to its end within %.0f s; going on", catch_up)


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


async def connect(
    urls: str | Sequence[str],
    *,
    deadline: float = 30.0,
    heartbeat: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AbstractRobustConnection:
    """Connect robustly to one of the broker addresses, retrying the first connect until `deadline`.

    `urls` is a list of addresses or a comma-separated string of them (the nodes of one cluster).
    The connection starts at a random one, so that processes spread over the nodes, and moves to
    the next whenever it is lost (FailoverConnection). connect_robust does not retry a first
    connect that fails; this does, trying every address before pausing.
    """
    addresses = split_urls(urls) if isinstance(urls, str) else tuple(urls)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    start = random.randrange(len(addresses))
    delay = 0.1
    attempt = 0
    while True:
        connection = FailoverConnection(addresses, start=start + attempt, heartbeat=heartbeat, ssl_context=ssl_context)
        attempt += 1
        try:
            await connection.connect(timeout=5)
            return connection
        except REFUSALS as err:
            with contextlib.suppress(Exception):
                await connection.close()
            raise refused(err, addresses[(start + attempt - 1) % len(addresses)]) from err
        except (TimeoutError, OSError, aiormq.exceptions.AMQPConnectionError) as err:
            with contextlib.suppress(Exception):
                await connection.close()
            untried = attempt % len(addresses) != 0  # another address may answer at once
            if loop.time() + (0.0 if untried else delay) > give_up:
                raise PublishError("cannot reach the broker") from err
            if untried:
                continue
            log.warning("broker not reachable yet, retrying in %.1fs", delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


async def connect_plain(
    urls: str | Sequence[str],
    *,
    deadline: float = 30.0,
    heartbeat: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AbstractConnection:
    """A connection that stays closed when it closes, to one of the addresses (a random one first).

    For a process that rebuilds its state per connection (the scheduler): it connects again itself,
    and each call starts at another address, so it fails over as the robust connection does.
    """
    addresses = split_urls(urls) if isinstance(urls, str) else tuple(urls)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    start = random.randrange(len(addresses))
    delay, attempt = 0.1, 0
    while True:
        url = addresses[(start + attempt) % len(addresses)]
        attempt += 1
        try:
            connection: AbstractConnection = await aio_pika.connect(
                with_heartbeat(url, heartbeat), timeout=5, ssl_context=ssl_context
            )
            return connection
        except REFUSALS as err:
            raise refused(err, url) from err
        except (TimeoutError, OSError, aiormq.exceptions.AMQPConnectionError) as err:
            untried = attempt % len(addresses) != 0
            if loop.time() + (0.0 if untried else delay) > give_up:
                raise PublishError("cannot reach the broker") from err
            if untried:
                continue
            log.warning("broker not reachable yet, retrying in %.1fs", delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def with_heartbeat(url: str, seconds: int | None) -> str:
    """The URL with an AMQP heartbeat, unless it names one: a hung peer is dropped after about three."""
    if seconds is None or "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={seconds}"


async def connect_broker(broker: BrokerSettings) -> AbstractRobustConnection:
    """Connect to the broker addresses the settings name, retrying for as long as they allow."""
    return await connect(
        broker.urls,
        deadline=broker.connect_deadline.total_seconds(),
        heartbeat=broker.heartbeat_s,
        ssl_context=broker.ssl_context(),
    )


def trusted(message: AbstractIncomingMessage, publishers: frozenset[str]) -> bool:
    """Whether a state or result message comes from a broker user we believe (none named: all of them).

    The broker refuses a publish whose user_id is not the publishing connection's user, so the
    property cannot be forged by anyone but those users.
    """
    return not publishers or message.user_id in publishers


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
    user_id: str | None = None,
) -> None:
    """Publish and wait for the broker's confirm; `user_id` must be the connection's own user.

    Raises Unroutable when a mandatory publish is returned, PublishError when it is nacked, not
    confirmed in time, or the channel is lost. Nothing is ever dropped silently.
    """
    message = aio_pika.Message(
        body,
        headers=dict(headers) if headers else None,
        content_type=CONTENT_TYPE,
        message_id=message_id or uuid.uuid4().hex,
        user_id=user_id,
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
    except aiormq.exceptions.DeliveryError as err:  # a nack
        await renew_channel(exchange)
        raise PublishError(f"publish to {exchange.name!r} was nacked") from err
    except (
        TimeoutError,
        aiormq.exceptions.AMQPError,
        ConnectionError,
        RuntimeError,
    ) as err:
        raise PublishError(f"publish to {exchange.name!r} was not confirmed") from err


# When each publishing channel was last renewed after a nack (see renew_channel).
_renewed: weakref.WeakKeyDictionary[AbstractChannel, float] = weakref.WeakKeyDictionary()
RENEW_AT_MOST_EVERY_S = 0.5


async def renew_channel(exchange: AbstractExchange) -> None:
    """After a nack, replace the exchange's channel with a fresh one; the robust channel reopens itself.

    RabbitMQ 3.10 nacks every publish, for as long as the channel lives, of a channel that was
    opened while a quorum queue it publishes to had lost its leader with a node; a channel opened
    a moment later on the same connection publishes at once (measured on a three-node cluster).
    A channel restored right after a failover is such a channel, so a nack retires the channel and
    the publisher's retry goes through a new one. Publishes nacked together renew it once.
    """
    channel = getattr(exchange, "channel", None)
    if not isinstance(channel, AbstractChannel) or channel.is_closed:
        return
    now = asyncio.get_running_loop().time()
    if now - _renewed.get(channel, -RENEW_AT_MOST_EVERY_S) < RENEW_AT_MOST_EVERY_S:
        return
    _renewed[channel] = now
    with contextlib.suppress(Exception):  # a channel already going away is reopened anyway
        underlay = await channel.get_underlay_channel()
        await underlay.close()
    log.warning("publishes to %r were nacked; reopened the channel", exchange.name)


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
    user_id: str | None = None,
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
                user_id=user_id,
            )
            return
        except PublishError as err:
            if stop is not None and stop.is_set():
                raise
            cause = type(err.__cause__).__name__
            log.warning("publish to %s not confirmed (%s); retrying in %.2fs", exchange.name, cause, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


async def recorded_queues(connection: AbstractRobustConnection, topology: Topology) -> list[str]:
    """The lanes and intakes the scheduler's registry names (read, then put back); empty if it has none."""
    return sorted(r.queue for r in await recorded_lanes(connection, topology))


async def recorded_lanes(connection: AbstractRobustConnection, topology: Topology) -> list[Any]:
    """The registry's LaneRecords (lanes and intakes, with their tenant and action), one per queue."""
    from google.protobuf.message import DecodeError

    from sluicegate.v1 import messages_pb2

    channel = await connection.channel()
    records: dict[str, messages_pb2.LaneRecord] = {}
    try:
        queue = await channel.declare_queue(topology.registry, passive=True)
        got = []
        while (message := await queue.get(fail=False, timeout=10)) is not None:
            got.append(message)
            with contextlib.suppress(DecodeError):
                records.update((r.queue, r) for r in messages_pb2.LaneRecordBatch.FromString(message.body).records)
        for message in got:
            await message.nack(requeue=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return []
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return [records[name] for name in sorted(records)]


async def delete_topology(
    connection: AbstractRobustConnection, topology: Topology, dispatcher_ids: list[str], *, partitions: int = 1
) -> None:
    """Delete every queue and exchange under the topology's prefix, of every partition (tests and the demo clean up)."""
    queues: list[str] = []
    exchanges: list[str] = []
    for part in (topology.of_partition(k) for k in range(partitions)):
        queues += await recorded_queues(connection, part)
        queues += [part.tasks, part.requeue, part.due, part.registry, part.leader]
        queues += [part.delay(ms) for ms in DELAY_RUNGS_MS]
        exchanges += [part.tasks, part.unrouted, part.requeue, part.due]
    channel = await connection.channel()
    queues += [topology.dead, topology.lifecycle, topology.cancels]
    queues += [topology.inbox(d) for d in dispatcher_ids] + [topology.control_queue(d) for d in dispatcher_ids]
    for name in queues:
        try:
            await channel.queue_delete(name)
        except aiormq.exceptions.AMQPError:
            channel = await connection.channel()  # a failed delete closes the channel
    for name in (*exchanges, topology.assign, topology.events, topology.dead, topology.control):
        try:
            await channel.exchange_delete(name)
        except aiormq.exceptions.AMQPError:
            channel = await connection.channel()
    await channel.close()
