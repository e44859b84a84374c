"""The scheduler process: follows the workers' state, takes the lead when it is free, and schedules.

Several schedulers may run; the one holding the lead's lock message (single active consumer of
the lead queue) schedules, the others keep their view of workers warm and take over within
milliseconds of its connection closing. Each broker connection is one session: when it ends,
everything held in memory is dropped (the broker redelivers it) and a new session starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from google.protobuf.message import DecodeError

from sluicegate import amqp, lifecycle
from sluicegate.bodies import check_state
from sluicegate.errors import InvalidInput, PublishError
from sluicegate.ratelimit import QuietLog
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.assignment import WorkerReport, received_of
from sluicegate_scheduler.core import Config, Core
from sluicegate_scheduler.limits import ConcurrencyLimits, RateLimits, Weights, parse_counts, parse_rates
from sluicegate_scheduler.metrics import SchedulerMetrics
from sluicegate_scheduler.outbox import Kind
from sluicegate_scheduler.settings import SchedulerSettings
from sluicegate_scheduler.shell import Session
from sluicegate_scheduler.topology import declare_own

log = logging.getLogger(__name__)
LOCK_ROTATION = 600.0
# What ends a session (the broker connection or a channel went away) rather than the scheduler.
SESSION_ENDINGS = (
    PublishError,
    ConnectionError,
    TimeoutError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
)  # re-issue the lead's lock before the broker's consumer timeout (30 min) takes it


def core_config(settings: SchedulerSettings, prefix: str, partitions: int = 1) -> Config:
    if settings.partition >= partitions:
        raise InvalidInput(f"scheduler partition {settings.partition} is not below the {partitions} partitions")
    return Config(
        prefix=prefix,
        partition=settings.partition,
        partitions=partitions,
        eager_share=settings.slot_share == "eager",
        synthetic_cost=settings.synthetic_cost.total_seconds(),
        synthetic_wait=settings.synthetic_wait,
        max_dispatch_attempts=settings.max_dispatch_attempts,
        max_payload_bytes=settings.max_payload_bytes,
        max_lanes=settings.max_lanes,
        max_waiting_per_tenant=settings.max_waiting_per_tenant,
        requeue_hold=settings.requeue_hold.total_seconds(),
        worker_cooldown=settings.worker_cooldown.total_seconds(),
        lane_idle=settings.lane_idle.total_seconds(),
        held_budget=settings.held_budget_mb * 1024 * 1024,
        max_batch=settings.max_batch,
        concurrency=ConcurrencyLimits(parse_counts(settings.concurrency, "concurrency", low=1)),
        rates=RateLimits(parse_rates(settings.rate_limits, "rate limits")),
        fairness=Weights(parse_counts(settings.fairness_weights, "weights", low=1, high=100)),
    )


class Scheduler:
    """Assigns every task to a worker that serves its action and has a free slot, or parks it in its lane.

    A consumed message is acked only after every task in it is published as an assignment, parked,
    delayed or buried, and confirmed by the broker.
    """

    def __init__(
        self, settings: SchedulerSettings, broker: BrokerSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix, settings.partition)
        self.instance_id = uuid.uuid4().hex[:12]
        self.core = Core(core_config(settings, broker.prefix, broker.partitions), clock=clock)
        self.lifecycle = lifecycle.LifecycleEmitter(
            self.topology, "scheduler", confirm_timeout=broker.confirm_timeout_s
        )
        self.core.on_event = self.lifecycle.emit
        self.core.recording = lambda: self.lifecycle.wanted
        self.pool = self.core.pool
        self.untrusted = 0  # worker-state messages dropped: not from a trusted broker user
        self.stats = self.core.stats
        self._bad_state = QuietLog(log, interval=10.0)
        self.clock = clock
        self.metrics = SchedulerMetrics(self)
        self.leading = asyncio.Event()
        self.failed: BaseException | None = None
        self._state = "new"
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        self._lock: AbstractIncomingMessage | None = None
        self._sessions_started = 0

    @property
    def waiting(self) -> int:
        return self.core.waiting

    @property
    def ready(self) -> bool:
        """Connected and either leading or standing by; false once a loop crashed."""
        return self._state == "running" and self._connection is not None and self.failed is None

    @property
    def sessions_started(self) -> int:
        """Broker sessions begun: one more after each lost connection (or a failure that ended a session)."""
        return self._sessions_started

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (retrying within the connect deadline), then follow the workers and stand for the lead."""
        if self._state != "new":
            raise RuntimeError(f"scheduler is {self._state}")
        self._state = "starting"
        first = await self._connect(self.broker.connect_deadline.total_seconds())
        self._runner = asyncio.create_task(self._supervise(first), name="scheduler")
        self._state = "running"
        log.info(
            "scheduler %s started on prefix %s, partition %d of %d",
            self.instance_id,
            self.broker.prefix,
            self.settings.partition,
            self.broker.partitions,
        )

    async def close(self) -> None:
        """Stop consuming and release what is held (the broker redelivers it); idempotent, never raises."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        if self.leading.is_set():
            with contextlib.suppress(Exception):
                await self.lifecycle.drain(timeout=min(self.broker.confirm_timeout_s, 2.0))
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._state = "closed"

    async def _connect(self, deadline: float) -> AbstractConnection:
        """A connection to one of the broker's addresses (another one each session: failover)."""
        return await amqp.connect_plain(
            self.broker.urls,
            deadline=deadline,
            heartbeat=self.settings.heartbeat,
            ssl_context=self.broker.ssl_context(),
        )

    async def _supervise(self, connection: AbstractConnection) -> None:
        """One TaskGroup for the process's loops: a crash is logged and fails readiness."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._sessions(connection), name="scheduler-sessions")
                group.create_task(self._forget_silent(), name="scheduler-forget")
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self.failed = err
            log.exception("scheduler stopped on an unexpected error")

    async def _sessions(self, connection: AbstractConnection | None) -> None:
        """One session per broker connection, for as long as the scheduler runs."""
        delay = 0.1
        while True:
            try:
                if connection is None:
                    connection = await self._connect(self.broker.connect_deadline.total_seconds())
                self._connection = connection
                await self._session(connection)
                delay = 0.1
            except* SESSION_ENDINGS as group:
                why = "; ".join(sorted({str(e) or type(e).__name__ for e in _leaves(group)}))[:300]
                log.warning("scheduler session ended (%s); connecting again", why)
            finally:
                self.leading.clear()
                self._lock = None
                self.core.end_session()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
                connection = self._connection = None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _session(self, connection: AbstractConnection) -> None:
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_close(_sender: object, exc: BaseException | None = None) -> None:
            if not lost.done():
                lost.set_exception(ConnectionError(f"broker connection closed: {exc or 'closed'}"))

        connection.close_callbacks.add(on_close)
        try:
            await self._lead(connection, lost)
        finally:
            connection.close_callbacks.discard(on_close)
            if lost.done() and not lost.cancelled():
                lost.exception()  # retrieved: the session ends either way
            lost.cancel()

    async def _lead(self, connection: AbstractConnection, lost: asyncio.Future[Any]) -> None:
        """Stand for the lead, then schedule until the connection is lost."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await amqp.Exchanges(self.topology).declare(channel)
        await declare_own(channel, self.topology)
        state = await connection.channel()
        # A name of this session's own: an earlier connection (to a node that froze, say) may still
        # hold the last one, which is exclusive to it.
        self._sessions_started += 1
        state_queue = await state.declare_queue(
            self.topology.scheduler_state_queue(f"{self.instance_id}-{self._sessions_started}"),
            durable=False,
            exclusive=True,
            auto_delete=True,
        )
        await state_queue.bind(exchanges.events, routing_key="state.*")
        await state_queue.consume(self._on_state, no_ack=True)
        lead = await connection.channel()
        await lead.set_qos(prefetch_count=100)
        await (await lead.declare_queue(self.topology.leader, passive=True)).consume(self._on_lock)
        await amqp.publish(channel.default_exchange, self.topology.leader, self.instance_id.encode())
        async with asyncio.TaskGroup() as group:
            group.create_task(self._rotate_lock(channel), name="scheduler-lock")
            group.create_task(self.lifecycle.run(exchanges.events), name="scheduler-lifecycle")
            waiting: asyncio.Future[Any] = group.create_task(self.leading.wait())
            await asyncio.wait([waiting, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                lost.result()
            log.info("scheduler %s leads; scheduling", self.instance_id)
            shell = Session(self.core, self.settings, self.broker, connection, self._wake, self._observe_batch)
            session: asyncio.Future[Any] = group.create_task(shell.run())
            try:
                await asyncio.wait([session, lost], return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    session.cancel()
                    lost.result()
                await session
            finally:
                shell.end()

    def _observe_batch(self, kind: Kind, size: int) -> None:
        if kind == Kind.ASSIGN:
            self.metrics.batch_size.observe(size)

    async def _on_lock(self, message: AbstractIncomingMessage) -> None:
        """Every lock message goes to the active consumer: holding one is leading. Keep the newest."""
        older, self._lock = self._lock, message
        if older is not None:
            with contextlib.suppress(Exception):
                await older.ack()
        self.leading.set()

    async def _rotate_lock(self, channel: aio_pika.abc.AbstractChannel) -> None:
        while True:
            await asyncio.sleep(LOCK_ROTATION)
            if self.leading.is_set():
                await amqp.publish(channel.default_exchange, self.topology.leader, self.instance_id.encode())

    async def _on_state(self, message: AbstractIncomingMessage) -> None:
        if not amqp.trusted(message, self.broker.trusted):
            self.untrusted += 1
            if self.untrusted & (self.untrusted - 1) == 0:  # 1, 2, 4, 8...: never a flood of lines
                log.warning("ignored %d worker-state message(s) from untrusted broker users", self.untrusted)
            return
        try:
            state = messages_pb2.DispatcherState.FromString(message.body)
        except DecodeError:
            self.core.stats.invalid_states += 1
            self._bad_state(self.clock(), "ignoring a worker-state message that does not decode")
            return
        try:
            check_state(state)
        except InvalidInput as err:
            self.core.stats.invalid_states += 1
            self._bad_state(self.clock(), "ignoring a worker-state message no dispatcher would send: %s", err)
            return
        partition = self.settings.partition
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
                received=received_of(w.received, w.received_by_partition, partition),
                prefetch=w.prefetch,
                principal=w.principal,
                leases=w.leases,
                acknowledged=w.acknowledged,
            )
            for w in state.workers
        ]
        keys = [((k.tenant, k.action, k.key), k.count) for k in state.key_leases]
        applied = self.pool.update(
            state.dispatcher_id,
            state.seq,
            state.draining,
            reports,
            self.clock(),
            keys,
            delta=state.delta,
            gone=state.gone,
            epoch=state.epoch,
        )
        if applied:
            self._wake.set()

    async def _forget_silent(self) -> None:
        stale = self.settings.dispatcher_stale_after.total_seconds()
        while True:
            await asyncio.sleep(min(1.0, stale / 2))
            for dispatcher_id in self.pool.forget_silent(self.clock(), stale):
                log.warning("dispatcher %s went silent; no longer assigning to it", dispatcher_id)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
