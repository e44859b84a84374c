"""The dispatcher process: consumes its inbox, forwards assignments over worker streams, settles them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sluicegate import amqp, lifecycle, telemetry
from sluicegate.errors import (
    InvalidInput,
    PublishError,
    Unroutable,
)
from sluicegate.expiry import is_expired
from sluicegate.reasons import Reason
from sluicegate.retry import effective_policy
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.wire import grpc_options, now_ms
from sluicegate_dispatcher.forwarding import Forwarder
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Sessions, WorkerSession
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_dispatcher.settlement import ReportOutcome, Settler
from sluicegate_dispatcher.stats import DispatcherStats
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)

SERVICE_NAME = "sluicegate.v1.WorkerService"
Event = worker_pb2.TaskEvent


class Dispatcher:
    """Serves worker sessions over gRPC and forwards the assignments its inbox receives.

    Every assignment of an inbox message ends in exactly one of: a terminal result published, or a
    confirmed republish to `requeue` with its reason. The message is acked once all of its
    assignments have ended that way; until then it is the lease, and if this process dies the
    broker dead-letters it to `requeue` when its TTL has passed.
    """

    def __init__(
        self,
        settings: DispatcherSettings,
        broker: BrokerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        lifecycle_settings: lifecycle.LifecycleSettings | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix)
        self.sessions = Sessions(receipt_window=settings.receipt_window)
        self.stats = DispatcherStats()
        self.metrics = DispatcherMetrics(self)
        self._exchanges = amqp.Exchanges(self.topology)
        self.lifecycle = lifecycle.LifecycleEmitter(
            self.topology, "dispatcher", lifecycle_settings, confirm_timeout=broker.confirm_timeout_s
        )
        self.settler = Settler(
            topology=self.topology,
            broker=broker,
            exchanges=self._exchanges,
            sessions=self.sessions,
            stats=self.stats,
            metrics=self.metrics,
            clock=clock,
            emitter=self.lifecycle,
        )
        self.clock = clock
        self.port = 0
        self.draining = False
        self._state = "new"
        self._connection: AbstractRobustConnection | None = None
        self._inbox: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._background: set[asyncio.Task[None]] = set()
        # Starts from the clock so that a restarted dispatcher keeping its id is not taken for stale.
        self._state_seq = now_ms() * 1000
        self._lock_timeout = settings.send_lock_timeout.total_seconds()
        self.forwarder = Forwarder(self)

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def ready(self) -> bool:
        """Serving and taking new work (false while starting, draining or stopped)."""
        return self._state == "running" and not self.draining

    # Lifecycle.

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"dispatcher is {self._state}")
        self._state = "starting"
        s = self.settings
        self._connection = await amqp.connect_broker(self.broker)
        publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._exchanges.declare(publish_channel)
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=s.prefetch)
        inbox_exchange = await consume_channel.get_exchange(self.topology.assign)
        self._inbox = await amqp.declare_bound_queue(
            consume_channel,
            inbox_exchange,
            self.topology.inbox(self.id),
            amqp.inbox_arguments(self.topology, s.inbox_ttl, s.inbox_expires),
            routing_key=self.id,
        )

        from sluicegate_dispatcher.service import WorkerServicer  # the gRPC edge imports this module

        self._server = grpc.aio.server(
            interceptors=telemetry.grpc_server_interceptors(),
            options=grpc_options(
                keepalive_s=s.keepalive_time.total_seconds(),
                keepalive_timeout_s=s.keepalive_timeout.total_seconds(),
                max_payload=s.max_payload_bytes,
                server=True,
            ),
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(s.listen)
        if self.port == 0:
            raise InvalidInput(f"cannot listen on {s.listen}")
        await self._server.start()
        self._consumer_tag = await self._inbox.consume(self.forwarder.on_message)
        self._spawn(self._reap(), "reaper")
        self._spawn(self._publish_state(), "state")
        self._spawn(self.lifecycle.run(self._exchanges.events), "lifecycle")
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._state = "running"
        log.info("dispatcher %s listening on port %d", self.id, self.port)

    async def close(self) -> None:
        """Drain and stop; idempotent, never raises."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        with contextlib.suppress(Exception):
            await self._drain()
        # Lifecycle events are records, not tasks: they never hold a stop for long.
        await self.lifecycle.drain(timeout=min(self.broker.confirm_timeout_s, 2.0))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop(grace=1.0)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._state = "closed"

    async def _drain(self) -> None:
        """Stop taking work, let running tasks finish within the grace, requeue the rest."""
        if self._server is None:
            return
        self.draining = True
        await self._health.enter_graceful_shutdown()
        self.sessions.changed()
        with contextlib.suppress(Exception):
            await self._send_state()
        deadline = self.clock() + self.settings.drain_grace.total_seconds()
        while self.sessions.leases and self.clock() < deadline:  # noqa: ASYNC110 - leases settle from many tasks
            await asyncio.sleep(0.05)
        if self._inbox is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._inbox.cancel(self._consumer_tag)
        for session in self.sessions:
            await self.settler.requeue_settled(self.sessions.close(session), Reason.DRAINING, "dispatcher stopping")
            if session.stream is not None:
                await self._tell_reconnect(session.stream)
        with contextlib.suppress(Exception):
            await self._send_state()

    async def _tell_reconnect(self, stream: WorkerStream) -> None:
        control = worker_pb2.Control(kind=worker_pb2.Control.KIND_RECONNECT, reason="dispatcher stopping")
        with contextlib.suppress(Exception):
            await stream.send(worker_pb2.ServerMessage(controls=[control]), self._lock_timeout)
        stream.end("dispatcher stopping")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"dispatcher-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Reports from workers (called by the gRPC edge).

    async def report(self, session: WorkerSession, events: Sequence[worker_pb2.TaskEvent]) -> list[int]:
        """Apply a batch of events from `session`; returns one verdict per event, in order.

        Receipts are recorded at once; one that comes after the task's start deadline is answered
        STALE and the task expires. Terminal results are published in batches and a lease is
        settled only after its result was confirmed; a retryable failure with retries left is
        requeued instead. Raises PublishError if a result was not confirmed (report again).
        """
        verdicts: list[int] = []
        outcome = ReportOutcome()
        for event in events:
            verdicts.append(self._apply(session, event, outcome))
        await self.settler.settle_report(outcome)
        return verdicts

    def _apply(self, session: WorkerSession, event: worker_pb2.TaskEvent, outcome: ReportOutcome) -> int:
        if not event.task_id or event.attempt < 1:
            return worker_pb2.EventVerdict.VERDICT_INVALID
        lease = self.sessions.holder((event.task_id, event.attempt), session)
        if lease is None or lease.finishing:
            self.stats.stale_reports += 1
            return worker_pb2.EventVerdict.VERDICT_STALE
        if event.kind in (Event.KIND_RECEIVED, Event.KIND_STARTED):
            if not lease.received and is_expired(lease.payload.task, now_ms()):
                lease.finishing = True  # too late to start: the worker drops it, the client hears EXPIRED
                outcome.expired.append(lease)
                return worker_pb2.EventVerdict.VERDICT_STALE
            if self.sessions.acknowledge(lease):
                self.metrics.receipt_ack.observe(max(0.0, self.clock() - lease.taken_at))
                self.lifecycle.emit(
                    lifecycle.assignment_event(
                        lifecycle.K.KIND_STARTED, lease.payload, worker_id=session.worker_id, dispatcher_id=self.id
                    )
                )
            return worker_pb2.EventVerdict.VERDICT_ACCEPTED
        if event.kind not in (Event.KIND_COMPLETED, Event.KIND_FAILED):
            return worker_pb2.EventVerdict.VERDICT_INVALID
        self.sessions.acknowledge(lease)
        lease.finishing = True
        task = lease.payload.task
        outcome.finished(lease, event, effective_policy(task, session.action_options.get(task.action)))
        return worker_pb2.EventVerdict.VERDICT_ACCEPTED

    async def lose_session(self, session: WorkerSession, reason: Reason, detail: str) -> None:
        if session.stream is not None:
            session.stream.end(detail)
        await self.settler.requeue_settled(self.sessions.close(session), reason, detail)

    # Background loops.

    async def _reap(self) -> None:
        """Requeue the leases of lost workers and of assignments never acknowledged."""
        s = self.settings
        while True:
            await asyncio.sleep(0.05)
            now = self.clock()
            for session in self.sessions.lost(
                now,
                heartbeat_timeout=s.heartbeat_timeout.total_seconds(),
                reconnect_grace=s.reconnect_grace.total_seconds(),
            ):
                log.warning("worker %s lost; requeueing %d leases", session.worker_id, len(session.leases))
                await self.lose_session(session, Reason.WORKER_LOST, "worker stopped heartbeating or streaming")
            for lease in self.sessions.overdue_receipts(now):
                stream = lease.session.stream
                if stream is not None:
                    stream.end("receipt not acknowledged in time; reconnect")
                    self.stats.streams_ended += 1
                await self.settler.requeue_lease(
                    lease, Reason.ACK_TIMEOUT, "worker did not acknowledge receipt in time"
                )

    async def _publish_state(self) -> None:
        interval = self.settings.state_interval.total_seconds()
        heartbeat = self.settings.state_heartbeat.total_seconds()
        published_version = -1
        last = 0.0
        while True:
            if self.sessions.version != published_version or self.clock() - last >= heartbeat:
                published_version = self.sessions.version
                last = self.clock()
                try:
                    await self._send_state()
                except (PublishError, Unroutable) as err:
                    log.warning("worker state not published: %s", err)
            await asyncio.sleep(interval)

    async def _send_state(self) -> None:
        self._state_seq += 1
        state = messages_pb2.DispatcherState(
            dispatcher_id=self.id, seq=self._state_seq, at_ms=now_ms(), draining=self.draining
        )
        for session in self.sessions:
            state.workers.append(
                messages_pb2.WorkerState(
                    worker_id=session.worker_id,
                    session_id=session.session_id,
                    tenant=session.tenant,
                    actions=sorted(session.actions),
                    labels=session.labels,
                    slots=session.slots,
                    free_slots=session.free_slots,
                    ready=session.ready and not self.draining,
                    received=session.received,
                )
            )
        # Running tasks per concurrency key, which the scheduler caps across dispatchers.
        for (tenant, action, key), count in sorted(self.sessions.key_leases().items()):
            state.key_leases.append(messages_pb2.KeyLeases(tenant=tenant, action=action, key=key, count=count))
        # Not mandatory: with no scheduler running nobody needs the snapshot; the next one replaces it.
        await amqp.publish(
            self._exchanges.events,
            self.topology.state_key(self.id),
            state.SerializeToString(),
            mandatory=False,
            persistent=False,
            timeout=self.broker.confirm_timeout_s,
        )
