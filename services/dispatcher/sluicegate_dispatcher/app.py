"""The dispatcher process: consumes its inbox, forwards assignments over worker streams, settles them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiormq
import grpc
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from sluicegate import amqp, telemetry
from sluicegate.errors import (
    InvalidInput,
    LockTimeout,
    NoFreeSlot,
    NotConnected,
    PublishError,
    StreamBroken,
    Unroutable,
)
from sluicegate.reasons import Reason
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.validation import check_task
from sluicegate.wire import grpc_options, now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, LeaseKey, Sessions, WorkerSession
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_dispatcher.stats import DispatcherStats
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)

SERVICE_NAME = "sluicegate.v1.WorkerService"
Event = worker_pb2.TaskEvent


class Delivery:
    """One inbox message and how many of its assignments are not settled yet."""

    __slots__ = ("message", "pending")

    def __init__(self, message: AbstractIncomingMessage, pending: int) -> None:
        self.message = message
        self.pending = pending


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
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix)
        self.sessions = Sessions(receipt_window=settings.receipt_window)
        self.stats = DispatcherStats()
        self.metrics = DispatcherMetrics(self)
        self.clock = clock
        self.port = 0
        self.draining = False
        self._state = "new"
        self._connection: AbstractRobustConnection | None = None
        self._exchanges = amqp.Exchanges(self.topology)
        self._inbox: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._background: set[asyncio.Task[None]] = set()
        # Starts from the clock so that a restarted dispatcher keeping its id is not taken for stale.
        self._state_seq = now_ms() * 1000
        self._lock_timeout = settings.send_lock_timeout.total_seconds()
        self._ack_timeout = settings.ack_timeout.total_seconds()

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
        self._connection = await amqp.connect(self.broker.url, deadline=self.broker.connect_deadline.total_seconds())
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
        self._consumer_tag = await self._inbox.consume(self._on_inbox)
        self._spawn(self._reap(), "reaper")
        self._spawn(self._publish_state(), "state")
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
            await self._requeue_all(self.sessions.close(session), Reason.DRAINING, "dispatcher stopping")
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

    # The inbox: the one place that decides each message's fate.

    async def _on_inbox(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = messages_pb2.AssignmentBatch.FromString(message.body)
        except DecodeError:
            log.error("inbox message %s is not an assignment batch; dead-lettering it", message.message_id)
            await self._settle_message(message, ok=False)
            return
        delivery = Delivery(message, len(batch.assignments))
        self.metrics.batch_size.observe(delivery.pending)
        if delivery.pending == 0:
            await self._settle_message(message, ok=True)
            return
        await asyncio.gather(*(self._forward(a, delivery) for a in batch.assignments))

    async def _settle_message(self, message: AbstractIncomingMessage, *, ok: bool) -> None:
        try:
            if ok:
                await message.ack()
            else:
                await message.nack(requeue=False)  # dead-letters to `requeue` (x-death: rejected)
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as err:
            # The channel was restored since delivery: the broker redelivers it and we see it again.
            log.debug("could not settle inbox message %s: %s", message.message_id, err)

    async def _item_done(self, delivery: Delivery) -> None:
        delivery.pending -= 1
        if delivery.pending == 0:
            await self._settle_message(delivery.message, ok=True)

    async def _forward(self, assignment: messages_pb2.Assignment, delivery: Delivery) -> None:
        key: LeaseKey = (assignment.task.task_id, assignment.attempt)
        current = self.sessions.holder_of(key)
        if current is not None:  # redelivered after a reconnect: the lease moves to this delivery
            self.stats.redeliveries += 1
            current.token = delivery
            return
        if self.sessions.was_settled(key):
            self.stats.redeliveries += 1
            await self._item_done(delivery)
            return
        if self.draining:
            await self._requeue(assignment, delivery, Reason.DRAINING, "dispatcher stopping")
            return
        try:
            if assignment.attempt < 1:
                raise InvalidInput("attempt must be at least 1")
            check_task(assignment.task, self.settings.max_payload_bytes)
            self.sessions.count_received(assignment.worker_id, assignment.session_id)
            session = self.sessions.target(assignment.worker_id, assignment.session_id)
        except InvalidInput as err:
            await self._requeue(assignment, delivery, Reason.INVALID, str(err))
            return
        except NotConnected as err:
            await self._requeue(assignment, delivery, Reason.NOT_CONNECTED, str(err))
            return
        except NoFreeSlot as err:
            await self._requeue(assignment, delivery, Reason.NO_SLOT, str(err))
            return
        stream: WorkerStream = session.stream
        span = telemetry.start(
            f"dispatch {assignment.task.action}",
            assignment.trace,
            kind=SpanKind.CONSUMER,
            attributes=telemetry.task_attributes(
                key[0],
                key[1],
                **{
                    "sluicegate.worker.id": session.worker_id,
                    "messaging.operation.type": "process",
                    "messaging.destination.name": self.topology.inbox(self.id),
                },
            ),
        )
        telemetry.carry(span, assignment.trace)  # the worker's spans become children of this one
        lease = self.sessions.take(session, key, assignment, delivery, self.clock(), self._ack_timeout)
        started_ns = time.time_ns()
        try:
            waited = await stream.send(worker_pb2.ServerMessage(assignments=[assignment]), self._lock_timeout)
        except LockTimeout:
            self.stats.lock_timeouts += 1
            self._timed_spans(span, started_ns, time.time_ns(), None)
            telemetry.fail(span, "send lock timeout")
            span.end()
            stream.end("send timed out; reconnect")
            self.stats.streams_ended += 1
            await self._requeue_lease(lease, Reason.LOCK_TIMEOUT, "send lock not acquired in time")
            # The stream is stalled: what the worker has not acknowledged goes elsewhere now rather
            # than after the receipt deadline. Safe even if it reads them later: a worker runs an
            # assignment only after its receipt is accepted, and these leases are gone.
            for stalled in self.sessions.unacknowledged(session):
                await self._requeue_lease(stalled, Reason.STREAM_STALLED, "stream stalled before receipt")
            return
        except StreamBroken as err:
            telemetry.fail(span, "stream broken")
            span.end()
            stream.end("stream write failed; reconnect")
            await self._requeue_lease(lease, Reason.STREAM_BROKEN, str(err))
            return
        self.stats.forwarded += 1
        self.stats.lock_wait_total_s += waited
        self._timed_spans(span, started_ns, started_ns + int(waited * 1e9), time.time_ns())
        span.end()

    def _timed_spans(self, parent: trace.Span, started_ns: int, acquired_ns: int, written_ns: int | None) -> None:
        """Record the lock wait (from before acquisition) and the write as child spans and histograms."""
        self.metrics.lock_wait.observe((acquired_ns - started_ns) / 1e9)
        ctx = trace.set_span_in_context(parent)
        tracer = telemetry.tracer()
        wait = tracer.start_span("send_lock.wait", context=ctx, start_time=started_ns)
        if written_ns is None:
            telemetry.fail(wait, "timed out")
        wait.end(end_time=acquired_ns)
        if written_ns is not None:
            self.metrics.stream_write.observe((written_ns - acquired_ns) / 1e9)
            tracer.start_span("stream.write", context=ctx, start_time=acquired_ns).end(end_time=written_ns)

    async def _requeue_lease(self, lease: Lease, reason: Reason, detail: str) -> None:
        """Requeue a lease unless it was settled already (first to settle decides)."""
        if lease.finishing or self.sessions.settle(lease.key) is None:
            return
        await self._requeue(lease.payload, lease.token, reason, detail)

    async def _requeue_all(self, leases: list[Lease], reason: Reason, detail: str) -> None:
        # `leases` come from Sessions.close, which settled them already.
        await asyncio.gather(
            *(self._requeue(lease.payload, lease.token, reason, detail) for lease in leases if not lease.finishing)
        )

    async def _requeue(
        self, assignment: messages_pb2.Assignment, delivery: Delivery, reason: Reason, detail: str
    ) -> None:
        """Send one assignment back to the scheduler with its reason, then count it settled."""
        record = messages_pb2.Requeue(
            reason=reason.value,
            detail=detail,
            worker_id=assignment.worker_id,
            attempt=assignment.attempt,
            at_ms=now_ms(),
        )
        returned = messages_pb2.Assignment()
        returned.CopyFrom(assignment)
        returned.history.append(record)
        span = telemetry.start(
            "requeue",
            assignment.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                assignment.task.task_id,
                assignment.attempt,
                **{"sluicegate.requeue.reason": reason.value, "messaging.destination.name": self.topology.requeue},
            ),
        )
        telemetry.carry(span, returned.trace)  # the reassignment continues the task's trace from here
        body = messages_pb2.AssignmentBatch(assignments=[returned]).SerializeToString()
        try:
            await amqp.publish_until_confirmed(
                self._exchanges.requeue,
                "",
                body,
                headers={amqp.REASON_HEADER: reason.value},
                timeout=self.broker.confirm_timeout_s,
            )
        except Unroutable:
            log.error(
                "the requeue queue is missing; leaving the task to the inbox TTL",
                extra={"task_id": assignment.task.task_id},
            )
            return
        finally:
            span.end()
        log.info(
            "requeued task %s attempt %d: %s",
            assignment.task.task_id,
            assignment.attempt,
            reason.value,
            extra={"task_id": assignment.task.task_id, "reason": reason.value},
        )
        self.stats.requeued[reason.value] += 1
        await self._item_done(delivery)

    # Reports from workers (called by the gRPC edge).

    async def report(self, session: WorkerSession, event: worker_pb2.TaskEvent) -> int:
        """Apply one event of `session`; returns its verdict."""
        key: LeaseKey = (event.task_id, event.attempt)
        lease = self.sessions.holder(key, session)
        if lease is None or lease.finishing:
            self.stats.stale_reports += 1
            return worker_pb2.EventVerdict.VERDICT_STALE
        if event.kind in (Event.KIND_RECEIVED, Event.KIND_STARTED):
            if self.sessions.acknowledge(lease):
                self.metrics.receipt_ack.observe(max(0.0, self.clock() - lease.taken_at))
            return worker_pb2.EventVerdict.VERDICT_ACCEPTED
        if event.kind not in (Event.KIND_COMPLETED, Event.KIND_FAILED):
            return worker_pb2.EventVerdict.VERDICT_INVALID
        self.sessions.acknowledge(lease)
        lease.finishing = True
        assignment: messages_pb2.Assignment = lease.payload
        failed = event.kind == Event.KIND_FAILED
        if failed and event.retryable and assignment.run_failures < assignment.task.max_retries:
            self.sessions.settle(key)
            await self._requeue(assignment, lease.token, Reason.HANDLER_FAILED, event.error[:1000])
            return worker_pb2.EventVerdict.VERDICT_ACCEPTED
        result = self._result(lease, event)
        span = telemetry.start(
            f"complete {assignment.task.action}",
            assignment.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                key[0], key[1], **{"sluicegate.task.status": "failed" if failed else "completed"}
            ),
        )
        if failed:
            telemetry.fail(span, event.error[:200])
        telemetry.carry(span, result.trace)
        try:
            await self.publish_result(result, assignment.task.reply_to)
        except PublishError:
            lease.finishing = False  # the worker retries the report
            raise
        finally:
            span.end()
        if assignment.task.submitted_at_ms:
            self.metrics.task_latency.observe(
                max(0.0, (result.finished_at_ms - assignment.task.submitted_at_ms) / 1000)
            )
        self.stats.failed += failed
        self.stats.completed += not failed
        self.sessions.settle(key)
        await self._item_done(lease.token)
        return worker_pb2.EventVerdict.VERDICT_ACCEPTED

    @staticmethod
    def _result(lease: Lease, event: worker_pb2.TaskEvent) -> messages_pb2.TaskResult:
        assignment: messages_pb2.Assignment = lease.payload
        task = assignment.task
        failed = event.kind == Event.KIND_FAILED
        return messages_pb2.TaskResult(
            task_id=task.task_id,
            status=messages_pb2.TASK_STATUS_FAILED if failed else messages_pb2.TASK_STATUS_COMPLETED,
            output=event.output,
            error=event.error,
            attempt=assignment.attempt,
            worker_id=lease.session.worker_id,
            submitted_at_ms=task.submitted_at_ms,
            finished_at_ms=now_ms(),
            history=assignment.history,
            trace=task.trace,
        )

    async def publish_result(self, result: messages_pb2.TaskResult, reply_to: str) -> None:
        body = messages_pb2.TaskResultBatch(results=[result]).SerializeToString()
        try:
            await amqp.publish(
                self._exchanges.events,
                self.topology.result_key(reply_to),
                body,
                timeout=self.broker.confirm_timeout_s,
            )
        except Unroutable:
            # The submitting client has gone; the result has nobody to go to. Counted, logged.
            self.stats.results_unclaimed += 1
            log.warning("result of task %s has no listener (client %s gone)", result.task_id, reply_to)

    async def lose_session(self, session: WorkerSession, reason: Reason, detail: str) -> None:
        if session.stream is not None:
            session.stream.end(detail)
        await self._requeue_all(self.sessions.close(session), reason, detail)

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
                await self._requeue_lease(lease, Reason.ACK_TIMEOUT, "worker did not acknowledge receipt in time")

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
        # Not mandatory: with no scheduler running nobody needs the snapshot; the next one replaces it.
        await amqp.publish(
            self._exchanges.events,
            self.topology.state_key(self.id),
            state.SerializeToString(),
            mandatory=False,
            persistent=False,
            timeout=self.broker.confirm_timeout_s,
        )
