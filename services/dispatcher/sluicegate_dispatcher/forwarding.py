"""Forwarding: each inbox message's assignments, grouped per worker, written to its stream under the send lock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from sluicegate import telemetry
from sluicegate.bodies import check_assignment, first_of_each
from sluicegate.errors import InvalidInput, LockTimeout, NoFreeSlot, NotConnected, StreamBroken
from sluicegate.expiry import is_expired
from sluicegate.ratelimit import QuietLog
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, LeaseKey, Sessions, WorkerSession
from sluicegate_dispatcher.settlement import Delivery, Settler
from sluicegate_dispatcher.stats import DispatcherStats
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)

Pending = tuple[messages_pb2.Assignment, Lease, trace.Span]  # an assignment about to be written


class Forwarder:
    """Sends each worker its assignments from an inbox message, or requeues each with its reason."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settler: Settler,
        stats: DispatcherStats,
        metrics: DispatcherMetrics,
        inbox: str,
        lock_timeout: float,
        ack_timeout: float,
        max_payload: int,
        clock: Callable[[], float],
        draining: Callable[[], bool],
    ) -> None:
        self.sessions, self.settler, self.stats, self.metrics = sessions, settler, stats, metrics
        self._inbox = inbox
        self._lock_timeout, self._ack_timeout, self._max_payload = lock_timeout, ack_timeout, max_payload
        self._clock, self._draining = clock, draining
        # How long a worker may owe the receipt of something written to it and still count as reading
        # (a loaded worker acknowledges late; a stalled one never does): half the receipt deadline.
        self._read_grace = max(lock_timeout, ack_timeout / 2)
        self._pumps: set[asyncio.Task[None]] = set()
        self._undecodable = QuietLog(log, interval=10.0, level=logging.ERROR)
        sessions.on_room = self.kick

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = messages_pb2.AssignmentBatch.FromString(message.body)
        except DecodeError:
            self._undecodable(self._clock(), "an inbox message is not an assignment batch; dead-lettering it")
            await self.settler.settle_message(message, ok=False)
            return
        delivery = Delivery(message, len(batch.assignments))
        self.metrics.assignment_batch.observe(delivery.pending)
        if delivery.pending == 0:
            await self.settler.settle_message(message, ok=True)
            return
        # One attempt twice in one message would take its lease twice: the second would replace the
        # first, whose slot and share of the delivery no one would give back. A copy is settled here.
        assignments, copies = first_of_each(batch.assignments)
        for copy in copies:
            self.stats.duplicate_assignments += 1
            self.sessions.count_received(copy.worker_id, copy.session_id)  # the scheduler counted its publish
            await self.settler.item_done(delivery)
        # Assignments for the same worker session go out in one stream write.
        groups: dict[tuple[str, str], list[messages_pb2.Assignment]] = {}
        for assignment in assignments:
            if not await self._seen_before(assignment, delivery):
                groups.setdefault((assignment.worker_id, assignment.session_id), []).append(assignment)
        await asyncio.gather(*(self._forward(group, delivery) for group in groups.values()))

    async def _seen_before(self, assignment: messages_pb2.Assignment, delivery: Delivery) -> bool:
        """Handle an attempt seen before; True if there is nothing more to do.

        The same delivery again after a reconnect takes the lease over (the old one can no longer be
        acked). Another message carrying the same attempt - a scheduler that placed it again after
        losing a confirm - is a copy: settled at once, while the lease keeps its own delivery.
        """
        key: LeaseKey = (assignment.task.task_id, assignment.attempt)
        current = self.sessions.holder_of(key)
        if current is not None:
            self.stats.redeliveries += 1
            if _still_open(current.token):
                # A copy is consumed like any assignment: the scheduler counted its publish, and a copy
                # left out of `received` would read as in transit forever, a slot it never gives again.
                self.sessions.count_received(assignment.worker_id, assignment.session_id, assignment.partition)
                await self.settler.item_done(delivery)
            else:
                current.token = delivery
            return True
        if self.sessions.was_settled(key):
            self.stats.redeliveries += 1
            self.sessions.count_received(assignment.worker_id, assignment.session_id, assignment.partition)
            await self.settler.item_done(delivery)
            return True
        return False

    async def _forward(self, group: list[messages_pb2.Assignment], delivery: Delivery) -> None:
        """Send a worker its assignments from one inbox message, or requeue each with its reason."""
        if self._draining():
            await self._requeue(group, delivery, Reason.DRAINING, "dispatcher stopping")
            return
        valid = []
        for assignment in group:
            try:
                check_assignment(assignment, self._max_payload)
            except InvalidInput as err:
                self.sessions.mark_settled((assignment.task.task_id, assignment.attempt))
                await self.settler.requeue(assignment, delivery, Reason.INVALID, str(err))
                continue
            self.sessions.count_received(assignment.worker_id, assignment.session_id, assignment.partition)
            cancelled = self.sessions.cancelled.get(assignment.task.task_id)
            if cancelled is not None:
                self.sessions.mark_settled((assignment.task.task_id, assignment.attempt))
                await self.settler.cancel_unsent(assignment, delivery, cancelled)  # never sent
                continue
            if is_expired(assignment.task, now_ms()):
                self.sessions.mark_settled((assignment.task.task_id, assignment.attempt))
                await self.settler.expire(assignment, delivery)  # too late to start: never sent
                continue
            valid.append(assignment)
        if not valid:
            return
        try:
            session = self.sessions.target(valid[0].worker_id, valid[0].session_id)
        except NotConnected as err:
            await self._requeue(valid, delivery, Reason.NOT_CONNECTED, str(err))
            return
        except NoFreeSlot as err:
            await self._requeue(valid, delivery, Reason.NO_SLOT, str(err))
            return
        room = session.free_slots
        if len(valid) > room:
            await self._requeue(valid[room:], delivery, Reason.NO_SLOT, f"worker {session.worker_id} has no free slot")
            valid = valid[:room]
        await self._send(session, valid, delivery)

    async def _requeue(
        self, assignments: list[messages_pb2.Assignment], delivery: Delivery, reason: Reason, detail: str
    ) -> None:
        # Remembered as settled: another copy of the attempt (placed twice) must not run after it came back.
        for a in assignments:
            self.sessions.mark_settled((a.task.task_id, a.attempt))
        await asyncio.gather(*(self.settler.requeue(a, delivery, reason, detail) for a in assignments))

    async def _send(self, session: WorkerSession, group: list[messages_pb2.Assignment], delivery: Delivery) -> None:
        """Take the leases (into the session's queue), then send what the worker has room for."""
        now = self._clock()
        for assignment in group:
            key: LeaseKey = (assignment.task.task_id, assignment.attempt)
            task = assignment.task
            concurrency = (task.tenant, task.action, task.concurrency_key) if task.concurrency_key else None
            lease = self.sessions.take(
                session,
                key,
                assignment,
                delivery,
                now,
                self._ack_timeout,
                concurrency=concurrency,
                priority=task.priority,
                queue=True,
            )
            lease.span = self._span(session, assignment)
        self.kick(session)

    def kick(self, session: WorkerSession) -> None:
        """Send what waits in the session's queue, from a task of its own.

        Not from the inbox consumer's callback: the broker client cancels those when its channel
        closes, and a send cancelled while it waited for the lock would leave its leases queued
        with nobody to send them.
        """
        if session.queued and session.worker_room > 0 and session.stream is not None:
            task = asyncio.create_task(self.pump(session))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def pump(self, session: WorkerSession) -> None:
        """Write out the queued leases the worker has room for, in as few stream messages as the size limit allows.

        Whoever gets the stream's lock writes everything queued by then (group commit): a sender
        that gets it after another wrote its leases finds nothing left and lets go at once. So a
        wait for the lock is a wait for one write, not for one write per sender ahead of it.
        """
        while (stream := session.stream) is not None and session.queued and session.worker_room > 0:
            wrote = await self._pump_once(session, stream)
            if wrote is None and session.stream is stream:
                return  # that stream failed: the queue waits for the session's next one (or goes back)
            if wrote is False:
                return

    async def _pump_once(self, session: WorkerSession, stream: WorkerStream) -> bool | None:
        """One hold of the stream's lock: True if it wrote, False if nothing was left, None if the stream failed."""
        started_ns = time.time_ns()
        try:
            await self._acquire(session, stream)
        except LockTimeout:
            if stream.ended.is_set():
                return None  # ended meanwhile, by whoever decided why: the queue waits for the next stream
            # Nothing went through for the lock timeout, and the worker owes receipts: it stalled.
            late = self.sessions.queued_leases(session)
            self._close_spans([lease.span for lease in late], started_ns, time.time_ns(), None, "send lock timeout")
            for lease in late:
                await self.settler.requeue_lease(lease, Reason.LOCK_TIMEOUT, "send lock not acquired in time")
            await self.stalled(session, stream)
            return None
        except StreamBroken:
            return None
        acquired_ns = time.time_ns()
        try:
            leases = self.sessions.forward_queued(session, self._clock(), self._ack_timeout)
            pending: list[Pending] = [(lease.payload, lease, lease.span) for lease in leases]
            for start, end in _chunks([a.ByteSize() for a, _, _ in pending], self._max_payload):
                if not await self._write(stream, pending[start:end], started_ns, acquired_ns):
                    for _, lease, span in pending[end:]:
                        span.end()
                        await self.settler.requeue_lease(lease, Reason.STREAM_BROKEN, "stream ended before this write")
                    return None
            return bool(leases)
        finally:
            stream.release()

    async def _acquire(self, session: WorkerSession, stream: WorkerStream) -> None:
        """The stream's send lock within the lock timeout, waiting on while the worker keeps up (see `waits_on`)."""
        while True:
            try:
                await stream.acquire(self._lock_timeout)
                return
            except LockTimeout:
                if not self.waits_on(session, stream):
                    raise

    def _span(self, session: WorkerSession, assignment: messages_pb2.Assignment) -> trace.Span:
        span = telemetry.start(
            f"dispatch {assignment.task.action}",
            assignment.trace,
            kind=SpanKind.CONSUMER,
            attributes=telemetry.task_attributes(
                assignment.task.task_id,
                assignment.attempt,
                **{
                    "sluicegate.worker.id": session.worker_id,
                    "messaging.operation.type": "process",
                    "messaging.destination.name": self._inbox,
                },
            ),
        )
        telemetry.carry(span, assignment.trace)  # the worker's spans become children of this one
        return span

    async def _write(self, stream: WorkerStream, chunk: list[Pending], started_ns: int, acquired_ns: int) -> bool:
        """One stream write, the lock held; on failure the chunk is requeued. True if written."""
        spans = [span for _, _, span in chunk]
        try:
            await stream.write_held(worker_pb2.ServerMessage(assignments=[a for a, _, _ in chunk]))
        except StreamBroken as err:
            self._close_spans(spans, started_ns, acquired_ns, None, "stream broken")
            stream.end("stream write failed; reconnect")
            for _, lease, _ in chunk:
                await self.settler.requeue_lease(lease, Reason.STREAM_BROKEN, str(err))
            return False
        self.stats.forwarded += len(chunk)
        written_at = self._clock()
        for _, lease, _ in chunk:
            lease.written_at = written_at
        self._close_spans(spans, started_ns, acquired_ns, time.time_ns(), None)
        return True

    def waits_on(self, session: WorkerSession, stream: WorkerStream) -> bool:
        """A send to the stream did not get its lock in time: True if it should wait on.

        The write holding the lock is slow to go through, but the worker has acknowledged everything
        written to it more than the read grace ago: the link or this process is slow, not the worker.
        Taking it for stalled would end its stream and requeue what it holds (on a loaded fleet,
        healthy workers by the hundred). The receipt deadline of what is in flight still bounds the
        wait: past it the stream ends.
        """
        if stream.ended.is_set() or not self.sessions.keeps_up(session, self._clock(), self._read_grace):
            return False
        self.stats.lock_waits_extended += 1
        return True

    async def stalled(self, session: WorkerSession, stream: WorkerStream) -> None:
        """A send to the stream could not get its lock in time: the worker is not reading.

        The stream is ended (the worker reconnects), and what the worker has not acknowledged goes
        elsewhere now rather than after the receipt deadline. Safe even if it reads them later: a
        worker runs an assignment only after its receipt is accepted, and these leases are gone.
        """
        self.stats.lock_timeouts += 1
        if not stream.ended.is_set():
            self.stats.streams_ended += 1
        stream.end("send timed out; reconnect")
        for lease in self.sessions.unacknowledged(session):
            await self.settler.requeue_lease(lease, Reason.STREAM_STALLED, "stream stalled before receipt")

    def _close_spans(
        self, spans: list[trace.Span], started_ns: int, acquired_ns: int, written_ns: int | None, error: str | None
    ) -> None:
        """End the dispatch spans, each with the lock wait (from before acquisition) and the write as children."""
        self.metrics.lock_wait.observe((acquired_ns - started_ns) / 1e9)
        if written_ns is not None:
            self.metrics.stream_write.observe((written_ns - acquired_ns) / 1e9)
        tracer = telemetry.tracer()
        for span in spans:
            if not span.is_recording():
                continue
            ctx = trace.set_span_in_context(span)
            wait = tracer.start_span("send_lock.wait", context=ctx, start_time=started_ns)
            if written_ns is None:
                telemetry.fail(wait, "timed out")
            wait.end(end_time=acquired_ns)
            if written_ns is not None:
                tracer.start_span("stream.write", context=ctx, start_time=acquired_ns).end(end_time=written_ns)
            if error is not None:
                telemetry.fail(span, error)
            span.end()


def _still_open(delivery: Delivery) -> bool:
    """Whether the channel a delivery came on is still open, so it can still be acked."""
    try:
        channel = getattr(delivery.message, "channel", None)
    except aiormq.exceptions.ChannelInvalidStateError:  # aio-pika's answer once that channel is gone
        return False
    return channel is not None and not getattr(channel, "is_closed", True)


def _chunks(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Split consecutive items into (start, end) runs whose sizes add up to at most `budget` (one at least)."""
    runs, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > budget:
            runs.append((start, index))
            start, total = index, 0
        total += size
    if sizes:
        runs.append((start, len(sizes)))
    return runs
