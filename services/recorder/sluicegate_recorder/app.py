"""The recorder process: consumes lifecycle events in batches and keeps one record per task in PostgreSQL.

Messages are acked only after the transaction holding their events committed. Two transactions
run at once by default, so that preparing one batch overlaps with PostgreSQL writing the other;
events fold the same in any order, and rows are locked in key order, so they cannot deadlock. While the store is
down the recorder holds what it has (up to its prefetch), retries with backoff and reports not
ready; everything else waits in the durable `<prefix>.lifecycle` queue, so nothing is lost and
the recorder catches up when the store is back. A crash between commit and ack only repeats
events, which the event ids make harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError

from sluicegate import amqp
from sluicegate.errors import InvalidInput, SluicegateError
from sluicegate.settings import BrokerSettings
from sluicegate.store import db, schema
from sluicegate.store.settings import StoreSettings
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate_recorder import writer
from sluicegate_recorder.fold import problem
from sluicegate_recorder.metrics import RecorderMetrics
from sluicegate_recorder.settings import RecorderSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecorderStats:
    recorded: int = 0
    duplicates: int = 0
    invalid: int = 0
    transactions: int = 0
    store_errors: int = 0
    pruned: int = 0


class Recorder:
    """Consumes `<prefix>.lifecycle` and writes task records; one task group runs its loops."""

    def __init__(
        self,
        settings: RecorderSettings,
        store: StoreSettings,
        broker: BrokerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not store.configured:
            raise InvalidInput("the recorder needs a task store: set SLUICEGATE_STORE_URL")
        self.settings, self.store, self.broker = settings, store, broker
        self.topology = amqp.Topology(broker.prefix)
        self.clock = clock
        self.stats = RecorderStats()
        self.metrics = RecorderMetrics(self)
        self.store_up = False
        self._state = "new"
        self._held: deque[AbstractIncomingMessage] = deque()
        self._writing = 0
        self._arrived = asyncio.Event()
        self._stopping = asyncio.Event()
        self._down_since: float | None = None
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Consuming, and the store took the last write."""
        return self._state == "running" and self.store_up

    @property
    def held(self) -> int:
        return len(self._held) + self._writing

    async def __aenter__(self) -> Recorder:
        try:
            await self.start()
        except BaseException:
            await self.close()  # what start opened before it failed
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"recorder is {self._state}")
        self._state = "starting"
        self._pool = await db.create_pool(self.store, max_size=self.settings.writers + 1)
        await db.wait_until_reachable(self._pool, self.store)
        try:
            async with self._pool.acquire() as connection:
                version = await schema.check(connection)
        except db.STORE_ERRORS as err:
            raise db.translate(err) from err
        self.store_up = True
        self._connection = await amqp.connect_broker(self.broker)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await amqp.declare_lifecycle_queue(channel, self.topology)
        self._supervisor = asyncio.create_task(self._supervise(), name="recorder")
        self._consumer_tag = await self._queue.consume(self._on_message)
        self._state = "running"
        log.info("recorder consuming %s into the task store (schema version %d)", self.topology.lifecycle, version)

    async def close(self) -> None:
        """Stop consuming, write what is in hand within the grace, then disconnect; never raises."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        self._stopping.set()
        self._arrived.set()
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._supervisor), self.settings.shutdown_grace.total_seconds())
            except TimeoutError:
                log.warning("%d lifecycle message(s) not written before stopping; they go back to the queue", self.held)
            except Exception:  # already logged by serve(); closing must go on
                pass
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()  # unacked messages go back to the queue
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except Exception:
                self._pool.terminate()
        self._state = "closed"

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raise if one of the recorder's loops failed."""
        if self._supervisor is None:
            raise RuntimeError("recorder is not started")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, self._supervisor}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if self._supervisor.done() and not self._supervisor.cancelled():
            failure = self._supervisor.exception()
            if failure is not None:
                log.error("recorder loop failed", exc_info=failure)
                raise SluicegateError("the recorder stopped: one of its loops failed (see the log)") from failure

    async def _supervise(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._record_loop(), name="recorder-write")
            group.create_task(self._prune_loop(), name="recorder-prune")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._held.append(message)
        self._arrived.set()

    # Writing.

    def _take(self) -> tuple[list[AbstractIncomingMessage], list[messages_pb2.LifecycleEvent]]:
        """Whatever arrived, in arrival order, up to max_batch_events events (at least one message)."""
        messages: list[AbstractIncomingMessage] = []
        events: list[messages_pb2.LifecycleEvent] = []
        while self._held and (not messages or len(events) < self.settings.max_batch_events):
            message = self._held.popleft()
            messages.append(message)
            events.extend(self._decode(message))
        return messages, events

    async def _record_loop(self) -> None:
        """Take what arrived and write it; up to `writers` transactions at once, each acking its own."""
        slots = asyncio.Semaphore(self.settings.writers)
        async with asyncio.TaskGroup() as writes:
            while True:
                if not self._held:
                    if self._stopping.is_set():
                        return  # the task group waits for the writes in flight
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                await slots.acquire()  # meanwhile more arrives: the next batch is larger (group commit)
                messages, events = self._take()
                self._writing += len(messages)
                writes.create_task(self._write_then_ack(messages, events, slots))

    async def _write_then_ack(
        self,
        messages: list[AbstractIncomingMessage],
        events: list[messages_pb2.LifecycleEvent],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            await self._write(events)
        finally:
            self._writing -= len(messages)
            slots.release()
        for message in messages:
            with contextlib.suppress(Exception):  # a delivery from before a reconnect comes again
                await message.ack()

    def _decode(self, message: AbstractIncomingMessage) -> list[messages_pb2.LifecycleEvent]:
        try:
            batch = messages_pb2.LifecycleBatch.FromString(message.body)
        except DecodeError:
            self.stats.invalid += 1
            log.warning("a lifecycle message is not a LifecycleBatch; dropped")
            return []
        events = []
        for event in batch.events:
            why = problem(event)
            if why is None:
                events.append(event)
            else:
                self.stats.invalid += 1
                log.warning("lifecycle event with an invalid %s dropped", why)
        return events

    async def _write(self, events: list[messages_pb2.LifecycleEvent]) -> None:
        """Write `events`, retrying while the store is down; isolate and drop rows it refuses."""
        if not events:
            return
        delay = 0.1
        while True:
            assert self._pool is not None
            started = self.clock()
            try:
                async with self._pool.acquire(timeout=self.store.connect_timeout.total_seconds()) as connection:
                    written = await writer.write(
                        connection, events, now_ms=now_ms(), max_output_bytes=self.settings.max_output_bytes
                    )
            except db.STORE_ERRORS as err:
                if db.is_bad_data(err):
                    await self._write_apart(events, err)
                    return
                self.stats.store_errors += 1
                self._store_down(err)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.settings.retry_max_backoff.total_seconds())
                continue
            self._store_back()
            self.metrics.commit_seconds.observe(self.clock() - started)
            self.metrics.batch_events.observe(len(events))
            self.stats.transactions += 1
            self.stats.recorded += written.recorded
            self.stats.duplicates += written.duplicates
            return

    async def _write_apart(self, events: list[messages_pb2.LifecycleEvent], err: BaseException) -> None:
        if len(events) == 1:
            self.stats.invalid += 1
            log.error("the task store refused a lifecycle event (%s); dropped", db.translate(err))
            return
        half = len(events) // 2
        await self._write(events[:half])
        await self._write(events[half:])

    def _store_down(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = self.clock()
            log.warning("%s; holding %d lifecycle message(s) and retrying", db.translate(err), self.held)
        self.store_up = False

    def _store_back(self) -> None:
        if self._down_since is not None:
            log.info("task store reachable again after %.1fs; catching up", self.clock() - self._down_since)
            self._down_since = None
        self.store_up = True

    # Retention.

    async def _prune_loop(self) -> None:
        interval = self.settings.prune_interval.total_seconds()
        while not self._stopping.is_set():
            try:
                assert self._pool is not None
                async with self._pool.acquire(timeout=self.store.connect_timeout.total_seconds()) as connection:
                    tasks, events = await writer.prune(connection, self.settings.retention)
                self.stats.pruned += tasks
                if tasks:
                    log.info("pruned %d task record(s) and %d event(s) past retention", tasks, events)
            except db.STORE_ERRORS as err:
                log.debug("pruning skipped: %s", db.translate(err))  # the write loop reports outages
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
