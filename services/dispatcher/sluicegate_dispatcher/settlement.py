"""The one place that carries out the fate of every inbox message and of each assignment in it.

An inbox message is acked when every assignment it carries has ended in one of two ways: its
terminal result was published and confirmed, or it was republished to `requeue` with its reason
and confirmed. Until then the message is the lease; if this process dies, the broker dead-letters
it to `requeue` when its TTL has passed. Nothing here acks before the broker confirmed what
replaces the message, so a batch never widens what a crash can lose.

Requeues, results and dead letters go out by group commit (one publish in flight per destination,
whatever piles up meanwhile in the next), and each is retried until the broker confirms it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, lifecycle, telemetry
from sluicegate.batching import GroupCommit
from sluicegate.errors import Unroutable
from sluicegate.expiry import expired_error
from sluicegate.reasons import Reason
from sluicegate.retry import RetryPolicy, stamp
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, Sessions, WorkerSession
from sluicegate_dispatcher.stats import DispatcherStats

log = logging.getLogger(__name__)

Event = worker_pb2.TaskEvent
Delivery = amqp.Delivery
UNCLAIMED_AFTER = 5.0  # seconds a result stays unroutable before its client is taken for gone


class Settler:
    def __init__(
        self,
        *,
        topology: amqp.Topology,
        broker: BrokerSettings,
        exchanges: amqp.Exchanges,
        sessions: Sessions,
        stats: DispatcherStats,
        metrics: DispatcherMetrics,
        emitter: lifecycle.LifecycleEmitter,
    ) -> None:
        self.topology, self.broker, self.exchanges = topology, broker, exchanges
        self.sessions, self.stats, self.metrics = sessions, stats, metrics
        self.lifecycle = emitter
        self._requeues = GroupCommit(self._publish_requeues, size=_size)
        self._results = GroupCommit(self._publish_results, size=_size)
        self._dead = GroupCommit(self._publish_dead, size=_size)

    async def close(self) -> None:
        for batcher in (self._requeues, self._results, self._dead):
            await batcher.close()

    # Messages.

    async def settle_message(self, message: AbstractIncomingMessage, *, ok: bool) -> None:
        try:
            if ok:
                await message.ack()
            else:
                await message.nack(requeue=False)  # dead-letters to `requeue` (x-death: rejected)
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as err:
            # The channel was restored since delivery: the broker redelivers it and we see it again.
            log.debug("could not settle inbox message %s: %s", message.message_id, err)

    async def item_done(self, delivery: Delivery) -> None:
        if delivery.done():
            await self.settle_message(delivery.message, ok=True)

    # Requeues.

    async def requeue(
        self, assignment: messages_pb2.Assignment, delivery: Delivery, reason: Reason, detail: str
    ) -> None:
        """Send one assignment back to the scheduler with its reason, then count it settled."""
        returned = messages_pb2.Assignment()
        returned.CopyFrom(assignment)
        returned.history.append(
            messages_pb2.Requeue(
                reason=reason.value,
                detail=detail,
                worker_id=assignment.worker_id,
                attempt=assignment.attempt,
                at_ms=now_ms(),
            )
        )
        span = telemetry.start(
            "requeue",
            assignment.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                assignment.task.task_id,
                assignment.attempt,
                **{
                    "sluicegate.requeue.reason": reason.value,
                    "messaging.destination.name": self.topology.of_partition(assignment.partition).requeue,
                },
            ),
        )
        telemetry.carry(span, returned.trace)  # the reassignment continues the task's trace from here
        try:
            await self._requeues.put(_requeue_destination(reason.value, assignment.partition), returned)
        except Unroutable:
            log.error("the requeue queue is missing; leaving the task to the inbox TTL", extra=_about(assignment))
            return
        finally:
            span.end()
        log.info(
            "requeued task %s attempt %d: %s",
            assignment.task.task_id,
            assignment.attempt,
            reason.value,
            extra={**_about(assignment), "reason": reason.value},
        )
        self.stats.requeued[reason.value] += 1
        await self.item_done(delivery)

    async def requeue_lease(self, lease: Lease, reason: Reason, detail: str) -> None:
        """Requeue a lease unless it was settled already (first to settle decides)."""
        if lease.finishing or self.sessions.settle(lease.key) is None:
            return
        await self.requeue(lease.payload, lease.token, reason, detail)

    async def requeue_settled(self, leases: Sequence[Lease], reason: Reason, detail: str) -> None:
        """Requeue leases that Sessions.close settled already (unless a result is on its way)."""
        for lease in leases:
            if not lease.finishing:
                await self.requeue(lease.payload, lease.token, reason, detail)

    async def lose(self, session: WorkerSession, reason: Reason, detail: str) -> None:
        """A session is gone (lost, replaced, drained): end its stream and send its attempts back."""
        if session.stream is not None:
            session.stream.end(detail)
        await self.requeue_settled(self.sessions.close(session), reason, detail)

    async def _publish_requeues(self, destination: str, assignments: list[messages_pb2.Assignment]) -> None:
        """Back to the scheduler partition that placed them: 0 through `requeue`, another straight to its queue."""
        reason, _, partition = destination.partition(PARTITION_MARK)
        exchange, key = self.exchanges.requeue, ""
        if partition:
            exchange = self.exchanges.default
            key = self.topology.of_partition(int(partition)).requeue
        await amqp.publish_until_confirmed(
            exchange,
            key,
            messages_pb2.AssignmentBatch(assignments=assignments).SerializeToString(),
            headers={amqp.REASON_HEADER: reason},
            timeout=self.broker.confirm_timeout_s,
        )

    # What a finished attempt comes to.

    async def retry(self, lease: Lease, policy: RetryPolicy, error: str) -> None:
        """A retryable failure with a retry left: back to the scheduler with the policy it waits by."""
        self.sessions.settle(lease.key)
        returned = messages_pb2.Assignment()
        returned.CopyFrom(lease.payload)
        stamp(returned.task, policy)
        await self.requeue(returned, lease.token, Reason.HANDLER_FAILED, error[:1000])

    async def bury_exhausted(self, lease: Lease, error: str) -> None:
        """Record a failure with no retry left in `dead` (confirmed) so that an operator can replay it.

        Comes before its FAILED result, so that whoever hears of the failure finds it there.
        """
        assignment: messages_pb2.Assignment = lease.payload
        task = assignment.task
        record = messages_pb2.Requeue(
            reason=Reason.RETRIES_EXHAUSTED.value,
            detail=error[:1000],
            worker_id=assignment.worker_id,
            attempt=assignment.attempt,
            at_ms=now_ms(),
        )
        dead = messages_pb2.DeadLetter(task=task, reasons=[*assignment.history, record], at_ms=record.at_ms)
        try:
            await self._dead.put(Reason.RETRIES_EXHAUSTED.value, dead)
        except Unroutable:
            # The task still gets its FAILED result; only the operator's copy is missing.
            log.error(
                "the dead queue is missing; task %s is not recorded there", task.task_id, extra=_about(assignment)
            )
            return
        self.stats.retries_exhausted += 1
        log.warning(
            "task %s failed with no retry left after attempt %d; recorded in %s",
            task.task_id,
            assignment.attempt,
            self.topology.dead,
            extra={**_about(assignment), "reason": Reason.RETRIES_EXHAUSTED.value},
        )

    async def _publish_dead(self, reason: str, dead: list[messages_pb2.DeadLetter]) -> None:
        await amqp.publish_until_confirmed(
            self.exchanges.dead,
            "",
            messages_pb2.DeadLetterBatch(dead=dead).SerializeToString(),
            headers={amqp.REASON_HEADER: reason},
            timeout=self.broker.confirm_timeout_s,
        )

    # Expired: not started within the schedule-to-start timeout.

    async def expire(self, assignment: messages_pb2.Assignment, delivery: Delivery) -> None:
        """An assignment too late to start and never sent: its EXPIRED result, then count it settled."""
        await self._publish_expired(assignment)
        await self.item_done(delivery)

    async def expire_lease(self, lease: Lease) -> None:
        """A lease whose receipt came after the start deadline (the worker was told to drop it)."""
        await self._publish_expired(lease.payload)
        self.sessions.settle(lease.key)
        await self.item_done(lease.token)

    async def _publish_expired(self, assignment: messages_pb2.Assignment) -> None:
        task = assignment.task
        result = messages_pb2.TaskResult(
            task_id=task.task_id,
            status=messages_pb2.TASK_STATUS_EXPIRED,
            error=expired_error(task),
            attempt=assignment.attempt,
            submitted_at_ms=task.submitted_at_ms,
            finished_at_ms=now_ms(),
            history=assignment.history,
        )
        span = telemetry.start(
            f"expire {task.action}",
            assignment.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                task.task_id, assignment.attempt, **{"sluicegate.task.status": "expired"}
            ),
        )
        telemetry.fail(span, result.error)
        telemetry.carry(span, result.trace)
        try:
            await self._results.put(task.reply_to, result)
        except Unroutable:
            self.stats.results_unclaimed += 1
            log.warning("expired result of task %s has no listener (client %s gone)", task.task_id, task.reply_to)
        finally:
            span.end()
        self.stats.expired += 1
        log.info("task %s expired: %s", task.task_id, result.error, extra=_about(assignment))

    # Cancelled: by a client, before or while it ran.

    async def cancel_unsent(self, assignment: messages_pb2.Assignment, delivery: Delivery, reason: str) -> None:
        """An assignment of a cancelled task, never sent: its CANCELLED result, then count it settled."""
        await self._publish_ended(assignment, messages_pb2.TASK_STATUS_CANCELLED, reason or "cancelled")
        self.stats.cancelled += 1
        await self.item_done(delivery)

    async def cancel_lease(self, lease: Lease, reason: str) -> None:
        """A leased attempt cancelled (its worker stopped it, or did not answer in time): CANCELLED, settled."""
        await self._publish_ended(lease.payload, messages_pb2.TASK_STATUS_CANCELLED, reason or "cancelled")
        self.stats.cancelled += 1
        self.sessions.settle(lease.key, finished=True)
        await self.item_done(lease.token)

    async def _publish_ended(
        self, assignment: messages_pb2.Assignment, status: messages_pb2.TaskStatus.ValueType, error: str
    ) -> None:
        task = assignment.task
        history = [
            *assignment.history,
            messages_pb2.Requeue(
                reason=Reason.CANCELLED.value, detail=error, worker_id=assignment.worker_id, attempt=assignment.attempt
            ),
        ]
        result = messages_pb2.TaskResult(
            task_id=task.task_id,
            status=status,
            error=error,
            attempt=assignment.attempt,
            worker_id=assignment.worker_id,
            submitted_at_ms=task.submitted_at_ms,
            finished_at_ms=now_ms(),
            history=history,
            trace=assignment.trace,
        )
        try:
            await self._results.put(task.reply_to, result)
        except Unroutable:
            self.stats.results_unclaimed += 1
        if self.lifecycle.wanted:
            self.lifecycle.emit(lifecycle.result_event(assignment, result))
        log.info("task %s cancelled: %s", task.task_id, error, extra=_about(assignment))

    # Results.

    async def finish(self, lease: Lease, event: worker_pb2.TaskEvent) -> None:
        """Publish a terminal result (with others for the same client), then settle its lease."""
        await self.finish_many([(lease, event)])

    async def finish_many(self, finished: Sequence[tuple[Lease, worker_pb2.TaskEvent]]) -> None:
        """Publish terminal results, several per message per client, then settle each lease."""
        by_client: dict[str, list[tuple[Lease, messages_pb2.TaskResult, Span]]] = {}
        for lease, event in finished:
            result, span = self._result(lease, event)
            by_client.setdefault(lease.payload.task.reply_to, []).append((lease, result, span))
        await asyncio.gather(*(self._deliver(reply_to, group) for reply_to, group in by_client.items()))

    async def _deliver(self, reply_to: str, group: list[tuple[Lease, messages_pb2.TaskResult, Span]]) -> None:
        try:
            await self._results.put_many(reply_to, [result for _, result, _ in group])
        except Unroutable:
            # The submitting client has gone; the results have nobody to go to. Counted, logged.
            self.stats.results_unclaimed += len(group)
            log.warning("%d result(s) have no listener (client %s gone)", len(group), reply_to)
        finally:
            for _, _, span in group:
                span.end()
        wanted = self.lifecycle.wanted
        for lease, result, _ in group:
            self._count(lease, result)
            if wanted:
                self.lifecycle.emit(lifecycle.result_event(lease.payload, result))
            self.sessions.settle(lease.key, finished=True)
            await self.item_done(lease.token)

    async def _publish_results(self, reply_to: str, results: list[messages_pb2.TaskResult]) -> None:
        """Publish results to their client's queue; unroutable for UNCLAIMED_AFTER seconds means it is gone.

        A client's queue outlives its connection, so an unroutable result is first taken for a broker
        that is still recovering its queues (after a restart) and published again.
        """
        self.metrics.result_batch.observe(len(results))
        body = messages_pb2.TaskResultBatch(results=results).SerializeToString()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + UNCLAIMED_AFTER
        while True:
            try:
                await amqp.publish_until_confirmed(
                    self.exchanges.events,
                    self.topology.result_key(reply_to),
                    body,
                    timeout=self.broker.confirm_timeout_s,
                    user_id=self.broker.user,  # what a client checks a result's publisher by
                )
                return
            except Unroutable:
                if loop.time() >= give_up:
                    raise
                await asyncio.sleep(0.25)

    def _result(self, lease: Lease, event: worker_pb2.TaskEvent) -> tuple[messages_pb2.TaskResult, Span]:
        assignment: messages_pb2.Assignment = lease.payload
        task = assignment.task
        failed = event.kind == Event.KIND_FAILED
        result = messages_pb2.TaskResult(
            task_id=task.task_id,
            status=messages_pb2.TASK_STATUS_FAILED if failed else messages_pb2.TASK_STATUS_COMPLETED,
            output=event.output,
            error=event.error,
            attempt=assignment.attempt,
            worker_id=lease.session.worker_id,
            submitted_at_ms=task.submitted_at_ms,
            finished_at_ms=now_ms(),
            history=assignment.history,
        )
        span = telemetry.start(
            f"complete {task.action}",
            assignment.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                task.task_id, assignment.attempt, **{"sluicegate.task.status": "failed" if failed else "completed"}
            ),
        )
        if failed:
            telemetry.fail(span, event.error[:200])
        telemetry.carry(span, result.trace)
        return result, span

    def _count(self, lease: Lease, result: messages_pb2.TaskResult) -> None:
        failed = result.status == messages_pb2.TASK_STATUS_FAILED
        self.stats.failed += failed
        self.stats.completed += not failed
        submitted = lease.payload.task.submitted_at_ms
        if submitted:
            self.metrics.task_latency.observe(max(0.0, (result.finished_at_ms - submitted) / 1000))


PARTITION_MARK = "@p"


def _requeue_destination(reason: str, partition: int) -> str:
    """One group commit per (reason, partition): partition 0 keeps the bare reason, as without partitions."""
    return f"{reason}{PARTITION_MARK}{partition}" if partition else reason


def _size(message: messages_pb2.Assignment | messages_pb2.TaskResult | messages_pb2.DeadLetter) -> int:
    return message.ByteSize()


def _about(assignment: messages_pb2.Assignment) -> dict[str, str]:
    return {"task_id": assignment.task.task_id}
