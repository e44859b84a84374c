"""The scheduler's AMQP shell for one broker connection: consumers in, confirmed publishes out, acks.

It translates deliveries into calls on the core and the core's outbox into publishes, and settles
every delivery in one place (`_settle`) once the core says all its items found their fate. It
owns no decision of its own beyond when to read a lane, which the core also decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from google.protobuf.message import DecodeError

from sluicegate import amqp
from sluicegate.bodies import valid_cancels
from sluicegate.errors import PublishError, Unroutable
from sluicegate.ratelimit import QuietLog
from sluicegate.reasons import Reason
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler import topology as own
from sluicegate_scheduler.core import Core
from sluicegate_scheduler.items import Origin
from sluicegate_scheduler.lanes import Lane, LaneKey
from sluicegate_scheduler.limits import Weights, parse_counts
from sluicegate_scheduler.outbox import Entry, Kind
from sluicegate_scheduler.registry import Registry
from sluicegate_scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)

X_DEATH_REASONS = {"expired": Reason.LEASE_EXPIRED, "rejected": Reason.REJECTED}
BATCH_TYPES: dict[Kind, Callable[[list[Any]], Any]] = {
    Kind.ASSIGN: lambda items: messages_pb2.AssignmentBatch(assignments=items),
    Kind.PARK: lambda items: messages_pb2.ParkedBatch(items=items),
    Kind.DELAY: lambda items: messages_pb2.ParkedBatch(items=items),
    Kind.DEAD: lambda items: messages_pb2.DeadLetterBatch(dead=items),
    Kind.RESULT: lambda items: messages_pb2.TaskResultBatch(results=items),
}


class Session:
    """Scheduling over one connection. Built by the Scheduler once this instance leads."""

    def __init__(
        self,
        core: Core,
        settings: SchedulerSettings,
        broker: BrokerSettings,
        connection: AbstractConnection,
        wake: asyncio.Event,
        on_batch: Callable[[Kind, int], None] = lambda _kind, _size: None,
    ) -> None:
        self.core, self.settings, self.broker = core, settings, broker
        self.topology = amqp.Topology(broker.prefix, settings.partition)
        self.connection = connection
        self.wake = wake
        self.on_batch = on_batch
        self.tenant_weights = Weights(_weights(settings.tenant_weights))
        self._group: asyncio.TaskGroup | None = None
        self._exchanges = amqp.Exchanges(self.topology)
        self._publish: AbstractChannel
        self._consume: AbstractChannel
        self._lanes_channel: AbstractChannel
        self._default: aio_pika.abc.AbstractExchange
        self._intakes: set[str] = set()  # tenants whose intake is consumed
        self._creating: set[str] = set()  # tenants whose intake is being created
        self._rungs: set[int] = set()
        self._consumers: dict[str, tuple[AbstractQueue, str]] = {}  # lane name -> (queue, tag)
        self._lane_work = asyncio.Event()
        self.registry: Registry
        self.alive = True  # a delivery handed over after the session ended must not reach the core
        # Anyone with broker credentials can publish garbage at line rate: one line per 10 s, counted.
        self._undecodable = QuietLog(log, interval=10.0, level=logging.ERROR)

    async def run(self) -> None:
        """Set up, then consume and publish until the connection fails (raising) or is cancelled."""
        t = self.topology
        self._publish = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._exchanges.declare(self._publish)
        self._default = self._publish.default_exchange
        self._consume = await self.connection.channel()
        self._lanes_channel = await self.connection.channel()
        await self._lanes_channel.set_qos(prefetch_count=self.settings.lane_prefetch)
        self._probe_channel = await self.connection.channel()  # passive declares: a missing queue closes it
        _, queues = await own.declare_own(self._publish, t)
        self.registry = Registry(self._publish, queues["registry"], t)
        async with asyncio.TaskGroup() as group:
            self._group = group
            for record in await self.registry.recover(self.connection):
                if record.intake:
                    await self._consume_intake(record.tenant)
                else:
                    self.core.book.add(LaneKey.of_record(record), found=True)
            # Every cancellation still on the stream first, then each new one as it comes.
            await amqp.follow_cancels(self.connection, t, self._on_cancels)
            await self._start_consumer(t.tasks, self.settings.intake_prefetch, self._on_shared_tasks)
            await self._start_consumer(t.requeue, self.settings.requeue_prefetch, self._on_requeue)
            await self._start_consumer(t.due, self.settings.requeue_prefetch, self._on_due)
            log.info("scheduling: %d lanes and %d intakes found", len(self.core.book), len(self._intakes))
            group.create_task(self._pump(), name="scheduler-pump")
            group.create_task(self._manage_lanes(), name="scheduler-lanes")
            self.wake.set()

    def end(self) -> None:
        self.alive = False

    async def _start_consumer(
        self, name: str, prefetch: int, callback: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> None:
        await self._consume.set_qos(prefetch_count=prefetch)
        # Passively declared, so a missing queue fails loudly instead of being created unbound.
        queue = await self._consume.declare_queue(name, passive=True)
        await queue.consume(callback)

    async def _consume_intake(self, tenant: str) -> None:
        if tenant in self._intakes:
            return
        # Taken before the first await: a second marker (or registry record) for the tenant that
        # comes meanwhile must not start a second consumer on the same queue.
        self._intakes.add(tenant)
        try:
            await own.declare_intake(self._publish, self.topology, tenant)
            prefetch = self.settings.intake_prefetch * self.tenant_weights(tenant)
            await self._start_consumer(self.topology.intake(tenant), prefetch, self._on_tenant_tasks)
        except BaseException:
            self._intakes.discard(tenant)
            raise

    # Deliveries in. Each decodes, hands its items to the core and wakes the pump; none awaits.

    async def _on_shared_tasks(self, message: AbstractIncomingMessage) -> None:
        """The shared intake: tasks of tenants without an intake of their own, for whom one is made."""
        await self._on_tasks(message, shared=True)

    async def _on_tenant_tasks(self, message: AbstractIncomingMessage) -> None:
        await self._on_tasks(message, shared=False)

    async def _on_tasks(self, message: AbstractIncomingMessage, *, shared: bool) -> None:
        if not self.alive:
            return
        headers = message.headers or {}
        marker = headers.get(amqp.MARKER_HEADER)
        if marker is not None:
            # Everything queued on the shared intake before the tenant's own existed has been read:
            # reading the tenant's intake now keeps its tasks in submission order.
            tenant = marker.decode() if isinstance(marker, bytes) else str(marker)
            self._spawn(self._consume_intake_then_ack(tenant, message))
            return
        try:
            batch = messages_pb2.TaskBatch.FromString(message.body)
        except DecodeError:
            self._spawn(self._bury_raw(message, "task message does not decode"))
            return
        _decoded(message)
        delivery = amqp.Delivery(message, len(batch.tasks))
        if delivery.pending == 0:
            self._spawn(_settle(message))
            return
        if shared:
            for tenant in {t.tenant for t in batch.tasks} - self._intakes - self._creating:
                if tenant and len(tenant) <= 64:
                    self._creating.add(tenant)
                    self._spawn(self._create_intake(tenant))
        self.core.take_tasks(batch.tasks, delivery, redelivered=bool(message.redelivered))
        self.wake.set()

    def _on_cancels(self, cancels: list[messages_pb2.Cancel]) -> None:
        if not self.alive:
            return
        cancels, bad = valid_cancels(cancels)
        self.core.stats.invalid_cancels += bad
        for cancel in cancels:
            self.core.cancel(cancel.task_id, cancel.reason)
        self.wake.set()

    async def _on_requeue(self, message: AbstractIncomingMessage) -> None:
        if not self.alive:
            return
        try:
            batch = messages_pb2.AssignmentBatch.FromString(message.body)
        except DecodeError:
            self._spawn(self._bury_raw(message, "requeued message does not decode"))
            return
        _decoded(message)
        reason = _x_death_reason(message)
        strays = [a for a in batch.assignments if self._stray(a)]
        mine = [a for a in batch.assignments if not self._stray(a)] if strays else batch.assignments
        # The strays' return counts as one more item: whichever of it and the core finishes last acks.
        delivery = amqp.Delivery(message, len(mine) + bool(strays))
        if delivery.pending == 0:
            self._spawn(_settle(message))
            return
        if strays:
            self._spawn(self._return_strays(strays, reason, delivery))
        if mine:
            self.core.take_requeued(mine, reason, delivery, redelivered=bool(message.redelivered))
            self.wake.set()

    def _stray(self, assignment: messages_pb2.Assignment) -> bool:
        """Placed by another partition (that still exists): it came here through a dead dispatcher's inbox."""
        return assignment.partition != self.topology.partition and assignment.partition < self.broker.partitions

    async def _return_strays(
        self, strays: list[messages_pb2.Assignment], reason: Reason | None, delivery: amqp.Delivery
    ) -> None:
        """Send requeued attempts of another partition to its own requeue queue, then count them done.

        Dispatchers send a partition's requeues straight to it; only what the broker dead-lettered
        from an inbox (a dispatcher that died, a message it rejected) lands on partition 0's queue.
        The broker's reason is written into the history, since the republished copy has no x-death.
        """
        by_partition: dict[int, list[messages_pb2.Assignment]] = {}
        for a in strays:
            if reason is not None:
                a.history.append(
                    messages_pb2.Requeue(
                        reason=reason.value, detail="dead-lettered by the broker", worker_id=a.worker_id,
                        attempt=a.attempt, at_ms=self.core.wall(),
                    )
                )  # fmt: skip
            by_partition.setdefault(a.partition, []).append(a)
        for partition, assignments in sorted(by_partition.items()):
            await amqp.publish_until_confirmed(
                self._default,
                self.topology.of_partition(partition).requeue,
                messages_pb2.AssignmentBatch(assignments=assignments).SerializeToString(),
                headers={amqp.REASON_HEADER: (reason or Reason.LEASE_EXPIRED).value},
                timeout=self.broker.confirm_timeout_s,
            )
        self.core.stats.returned_strays += len(strays)
        if delivery.done():
            await _settle(delivery.message)

    async def _on_due(self, message: AbstractIncomingMessage) -> None:
        await self._on_parked(message, Origin.DUE, None)

    async def _on_parked(self, message: AbstractIncomingMessage, origin: Origin, lane: Lane | None) -> None:
        if not self.alive:
            return
        try:
            batch = messages_pb2.ParkedBatch.FromString(message.body)
        except DecodeError:
            self._spawn(self._bury_raw(message, "parked message does not decode"))
            return
        _decoded(message)
        delivery = amqp.Delivery(message, len(batch.items))
        if delivery.pending == 0:
            self._spawn(_settle(message))
            return
        self.core.take_parked(batch.items, delivery, origin, lane, redelivered=bool(message.redelivered))
        self.wake.set()

    # Tenants' intakes.

    async def _create_intake(self, tenant: str) -> None:
        try:
            await own.declare_intake(self._publish, self.topology, tenant)
            await self.registry.add(
                messages_pb2.LaneRecord(queue=self.topology.intake(tenant), tenant=tenant, intake=True)
            )
            await amqp.publish(
                self._default, self.topology.tasks, b"", headers={amqp.MARKER_HEADER: tenant}, persistent=False
            )
        except (PublishError, Unroutable, aiormq.exceptions.AMQPError) as err:
            log.warning("could not create the intake of tenant %s (it stays on the shared one): %s", tenant, err)
            self._creating.discard(tenant)

    async def _consume_intake_then_ack(self, tenant: str, marker: AbstractIncomingMessage) -> None:
        await self._consume_intake(tenant)
        self._creating.discard(tenant)
        await _settle(marker)

    # The pump: rounds of decisions, then what they call for.

    async def _pump(self) -> None:
        core = self.core
        while True:
            timeout = None if core.wake_at is None else max(0.0, core.wake_at - core.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, 1.0) if timeout is not None else 1.0):
                    await self.wake.wait()
            self.wake.clear()
            core.round()
            for delivery in core.to_ack:
                self._spawn(_settle(delivery.message))
            core.to_ack.clear()
            for destination in core.outbox.ready(self._can_send):
                self._spawn(self._send(destination))
            self._lane_work.set()

    def _can_send(self, kind: Kind, destination: str) -> bool:
        if kind == Kind.PARK:
            lane = self.core.book.named(destination)
            return lane is not None and lane.ready
        if kind == Kind.DELAY:
            return int(destination) in self._rungs
        return True

    async def _send(self, destination: tuple[Kind, str]) -> None:
        kind, name = destination
        batch = self.core.outbox.take(destination)
        try:
            await self._publish_batch(kind, name, batch)
        except asyncio.CancelledError:
            # The session is ending: the batch stays in flight, where end_session finds it (it may
            # have arrived, so its deliveries come again as the same attempts).
            raise
        except Unroutable:
            self.core.failed(kind, name, batch, unroutable=True)
        except Exception as err:  # PublishError, or a channel or connection closed under it: maybe arrived
            log.warning("%s publish to %s not confirmed (%r); trying again", kind.value, name, err)
            self.core.failed(kind, name, batch)
            await asyncio.sleep(0.2)
        else:
            self.core.confirmed(kind, name, batch)
        self.core.outbox.sent(destination)
        self.wake.set()

    async def _publish_batch(self, kind: Kind, name: str, batch: list[Entry]) -> None:
        body = BATCH_TYPES[kind]([e.body for e in batch]).SerializeToString()
        self.on_batch(kind, len(batch))
        timeout = self.broker.confirm_timeout_s
        if kind == Kind.ASSIGN:
            await amqp.publish(self._exchanges.assign, name, body, timeout=timeout)
        elif kind == Kind.PARK:
            await amqp.publish(self._default, name, body, timeout=timeout)
        elif kind == Kind.DELAY:
            await amqp.publish(self._default, self.topology.delay(int(name)), body, timeout=timeout)
        elif kind == Kind.DEAD:
            await amqp.publish(self._exchanges.dead, "", body, headers={amqp.REASON_HEADER: name}, timeout=timeout)
        elif kind == Kind.RESULT:
            await amqp.publish(
                self._exchanges.events, self.topology.result_key(name), body, timeout=timeout, user_id=self.broker.user
            )

    # Lanes: declared before the first park, read while someone serves them, deleted when idle.

    async def _manage_lanes(self) -> None:
        while True:
            await self._lane_work.wait()
            self._lane_work.clear()
            for rung in {int(d) for k, d in self.core.outbox.ready() if k == Kind.DELAY} - self._rungs:
                await own.declare_rung(self._publish, self.topology, rung)
                self._rungs.add(rung)
                self.wake.set()
            for lane in self.core.book:
                if not lane.ready and (lane.parking or self.core.outbox.pending(Kind.PARK, lane.name)):
                    await self._prepare(lane)
            start, stop = self.core.consumption()
            for lane in stop:
                await self._stop_reading(lane)
            for lane in start:
                await self._start_reading(lane)
            for lane in self.core.idle_lanes():
                await self._delete(lane)
            await self._probe()
            await asyncio.sleep(0.05)  # lane changes in bulk, never a tight loop

    async def _probe(self) -> None:
        """Ask the broker about lanes found after a restart: once one reads empty, new tasks may skip it."""
        now = self.core.clock()
        for lane in self.core.book:
            if lane.parked is None and lane.consuming and not lane.held and now - lane.probed_at >= 1.0:
                lane.probed_at = now
                counts = await self._counts(lane.name)
                if counts is not None and counts[0] == 0:
                    lane.drained()
                    self.wake.set()

    async def _counts(self, name: str) -> tuple[int, int] | None:
        """A queue's (messages, consumers) as the broker counts them, or None if it does not exist.

        Asked on a channel of its own: a passive declare of a missing queue closes its channel, and
        a lane can be gone (deleted by a scheduler that led before) without ending this session.
        """
        try:
            queue = await self._probe_channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._probe_channel = await self.connection.channel()
            return None
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def _prepare(self, lane: Lane) -> None:
        """Record a lane, then declare it; only then may anything be parked in it."""
        await self.registry.add(lane.key.record(self.topology.own))
        await own.declare_lane(self._publish, lane.name)
        lane.ready = True
        self.wake.set()

    async def _start_reading(self, lane: Lane) -> None:
        counts = await self._counts(lane.name)
        if counts is None:  # gone: declared again before anything is parked or read there
            lane.ready = False
            if lane.parked is None:
                lane.drained()
            return
        if lane.parked is None and counts[0] == 0:
            lane.drained()  # found after a restart, and empty: its count is known now
        queue = await self._lanes_channel.get_queue(lane.name, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_parked(message, Origin.LANE, lane)

        self._consumers[lane.name] = (queue, await queue.consume(on_message))
        lane.consuming = True

    async def _stop_reading(self, lane: Lane) -> None:
        queue, tag = self._consumers.pop(lane.name, (None, ""))
        lane.consuming = False
        if queue is not None:
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await queue.cancel(tag)

    async def _delete(self, lane: Lane) -> None:
        """Delete an idle lane, only once the broker confirms it holds nothing.

        Quorum queues take no if-empty delete, so emptiness is made certain instead: no park goes
        to it meanwhile (only the leading scheduler parks), its consumer is cancelled so nothing is
        in flight to us, and the broker counts no message in it.
        """
        lane.ready = False  # parks for it wait until it is declared again
        await self._stop_reading(lane)
        await asyncio.sleep(0.05)  # deliveries sent before the cancel have been handed to the core
        if not lane.empty or self.core.outbox.pending(Kind.PARK, lane.name):
            lane.ready, lane.idle_since = True, None
            return
        counts = await self._counts(lane.name)
        if counts is not None and any(counts):
            lane.ready, lane.idle_since = True, None
            lane.parked = None  # not what the count said: read it again to know
            return
        if counts is not None:
            await self._lanes_channel.queue_delete(lane.name)
        self.core.lane_deleted(lane)

    # Messages that are not ours to read.

    async def _bury_raw(self, message: AbstractIncomingMessage, why: str) -> None:
        self._undecodable(self.core.clock(), "%s; moving it to %s", why, self.topology.dead)
        await amqp.publish_until_confirmed(
            self._exchanges.dead, "", message.body, headers={amqp.REASON_HEADER: "undecodable"}
        )
        await _settle(message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the session's task group; a delivery after the session ended is left to the broker."""
        try:
            if self._group is None:
                raise RuntimeError("session not running")
            self._group.create_task(coro)
        except RuntimeError:
            coro.close()


async def _settle(message: AbstractIncomingMessage) -> None:
    """The one place a consumed message is acked: every item it carried found its fate."""
    try:
        await message.ack()
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as err:
        log.debug("could not ack %s (the broker redelivers it): %s", message.message_id, err)


def _decoded(message: AbstractIncomingMessage) -> None:
    """Its body is decoded: drop the raw bytes, so that a task waiting for its fate is held once, not twice."""
    if isinstance(message, aio_pika.IncomingMessage):
        message.body = b""


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


def _weights(text: str) -> dict[str, int]:
    return parse_counts(text, "weights", low=1, high=100)
