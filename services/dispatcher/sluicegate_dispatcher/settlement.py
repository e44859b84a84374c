"""The one place that decides the fate of every inbox message and of each assignment in it.

An inbox message is acked when every assignment it carries has ended in one of two ways: its
terminal result was published and confirmed, or it was republished to `requeue` with its reason
and confirmed. Until then the message is the lease; if this process dies, the broker dead-letters
it to `requeue` when its TTL has passed. Nothing here acks before the broker confirmed what
replaces the message, so a batch never widens what a crash can lose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, lifecycle, telemetry
from sluicegate.errors import PublishError, Unroutable
from sluicegate.reasons import Reason
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, Sessions
from sluicegate_dispatcher.stats import DispatcherStats

log = logging.getLogger(__name__)

Event = worker_pb2.TaskEvent


class Delivery:
    """One inbox message and how many of its assignments are not settled yet."""

    __slots__ = ("message", "pending")

    def __init__(self, message: AbstractIncomingMessage, pending: int) -> None:
        self.message = message
        self.pending = pending


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
        clock: Callable[[], float],
        emitter: lifecycle.LifecycleEmitter,
    ) -> None:
        self.topology, self.broker, self.exchanges = topology, broker, exchanges
        self.sessions, self.stats, self.metrics, self.clock = sessions, stats, metrics, clock
        self.lifecycle = emitter

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
        delivery.pending -= 1
        if delivery.pending == 0:
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
                **{"sluicegate.requeue.reason": reason.value, "messaging.destination.name": self.topology.requeue},
            ),
        )
        telemetry.carry(span, returned.trace)  # the reassignment continues the task's trace from here
        try:
            await amqp.publish_until_confirmed(
                self.exchanges.requeue,
                "",
                messages_pb2.AssignmentBatch(assignments=[returned]).SerializeToString(),
                headers={amqp.REASON_HEADER: reason.value},
                timeout=self.broker.confirm_timeout_s,
            )
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

    async def requeue_many(
        self, assignments: Sequence[messages_pb2.Assignment], delivery: Delivery, reason: Reason, detail: str
    ) -> None:
        await asyncio.gather(*(self.requeue(a, delivery, reason, detail) for a in assignments))

    async def requeue_lease(self, lease: Lease, reason: Reason, detail: str) -> None:
        """Requeue a lease unless it was settled already (first to settle decides)."""
        if lease.finishing or self.sessions.settle(lease.key) is None:
            return
        await self.requeue(lease.payload, lease.token, reason, detail)

    async def requeue_settled(self, leases: Sequence[Lease], reason: Reason, detail: str) -> None:
        """Requeue leases that Sessions.close settled already (unless a result is on its way)."""
        await asyncio.gather(
            *(self.requeue(lease.payload, lease.token, reason, detail) for lease in leases if not lease.finishing)
        )

    # Results.

    async def finish(self, finals: Sequence[tuple[Lease, worker_pb2.TaskEvent]]) -> None:
        """Publish terminal results, several per message per client, then settle their leases.

        Raises PublishError if any group was not confirmed; its leases stay held (the worker
        reports again), while the groups that were confirmed are settled.
        """
        groups: dict[str, list[tuple[Lease, messages_pb2.TaskResult, Span]]] = {}
        for lease, event in finals:
            result, span = self._result(lease, event)
            groups.setdefault(lease.payload.task.reply_to, []).append((lease, result, span))
        outcomes = await asyncio.gather(
            *(self._publish_group(reply_to, group) for reply_to, group in groups.items()), return_exceptions=True
        )
        failure: BaseException | None = None
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = outcome
                for lease, _, _ in group:
                    lease.finishing = False
                continue
            for lease, result, _ in group:
                self._count(lease, result)
                self.lifecycle.emit(lifecycle.result_event(lease.payload, result))
                self.sessions.settle(lease.key)
                await self.item_done(lease.token)
        if failure is not None:
            raise PublishError("the broker did not confirm a result") from failure

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

    async def _publish_group(self, reply_to: str, group: list[tuple[Lease, messages_pb2.TaskResult, Span]]) -> None:
        body = messages_pb2.TaskResultBatch(results=[result for _, result, _ in group]).SerializeToString()
        self.metrics.result_batch.observe(len(group))
        try:
            await amqp.publish(
                self.exchanges.events,
                self.topology.result_key(reply_to),
                body,
                timeout=self.broker.confirm_timeout_s,
            )
        except Unroutable:
            # The submitting client has gone; the results have nobody to go to. Counted, logged.
            self.stats.results_unclaimed += len(group)
            log.warning("%d result(s) have no listener (client %s gone)", len(group), reply_to)
        finally:
            for _, _, span in group:
                span.end()

    def _count(self, lease: Lease, result: messages_pb2.TaskResult) -> None:
        failed = result.status == messages_pb2.TASK_STATUS_FAILED
        self.stats.failed += failed
        self.stats.completed += not failed
        submitted = lease.payload.task.submitted_at_ms
        if submitted:
            self.metrics.task_latency.observe(max(0.0, (result.finished_at_ms - submitted) / 1000))


def _about(assignment: messages_pb2.Assignment) -> dict[str, str]:
    return {"task_id": assignment.task.task_id}
