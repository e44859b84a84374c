"""The one place that decides the fate of every inbox message and of each assignment in it.

An inbox message is acked when every assignment it carries has ended in one of two ways: its
terminal result was published and confirmed, or it was republished to `requeue` with its reason
and confirmed. Until then the message is the lease; if this process dies, the broker dead-letters
it to `requeue` when its TTL has passed. Nothing here acks before the broker confirmed what
replaces the message, so a batch never widens what a crash can lose.

What a worker's terminal report means is decided here too (`fate_of`): a result for the client, a
retry for the scheduler (with the task's effective retry policy stamped in, so that it can wait
the backoff), or, once no retry is left, a record in `dead` as well as the FAILED result. A task
not started within its schedule-to-start timeout gets an EXPIRED result instead of running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import Span, SpanKind

from sluicegate import amqp, lifecycle, telemetry
from sluicegate.errors import PublishError, Unroutable
from sluicegate.expiry import expired_error
from sluicegate.reasons import Reason
from sluicegate.retry import RetryPolicy, stamp
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2, worker_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, Sessions
from sluicegate_dispatcher.stats import DispatcherStats

log = logging.getLogger(__name__)

Event = worker_pb2.TaskEvent


class Fate(Enum):
    """What becomes of an attempt its worker reported finished."""

    FINISH = "finish"  # its result goes to the client
    RETRY = "retry"  # back to the scheduler, which runs it again after the backoff
    EXHAUSTED = "exhausted"  # failed with no retry left: recorded in `dead`, and FAILED to the client


def fate_of(event: worker_pb2.TaskEvent, run_failures: int, policy: RetryPolicy) -> Fate:
    """Only a retryable failure is retried, and only while the policy allows (a PermanentError never is)."""
    if event.kind != Event.KIND_FAILED or not event.retryable:
        return Fate.FINISH
    return Fate.RETRY if run_failures < policy.max_retries else Fate.EXHAUSTED


@dataclass(slots=True)
class ReportOutcome:
    """What one worker report decided for the leases it names; Settler.settle_report carries it out."""

    finals: list[tuple[Lease, worker_pb2.TaskEvent]] = field(default_factory=list)
    exhausted: list[tuple[Lease, worker_pb2.TaskEvent]] = field(default_factory=list)  # also in finals
    retries: list[tuple[Lease, worker_pb2.TaskEvent, RetryPolicy]] = field(default_factory=list)
    expired: list[Lease] = field(default_factory=list)  # received after the start deadline: never ran

    def finished(self, lease: Lease, event: worker_pb2.TaskEvent, policy: RetryPolicy) -> None:
        fate = fate_of(event, lease.payload.run_failures, policy)
        if fate is Fate.RETRY:
            self.retries.append((lease, event, policy))
            return
        self.finals.append((lease, event))
        if fate is Fate.EXHAUSTED:
            self.exhausted.append((lease, event))


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

    # What a report decided.

    async def settle_report(self, outcome: ReportOutcome) -> None:
        """Carry out a report's decisions; raises PublishError if a result was not confirmed (report again)."""
        for lease, event, policy in outcome.retries:
            await self.retry(lease, policy, event.error)
        await asyncio.gather(*(self.expire_lease(lease) for lease in outcome.expired))
        if outcome.exhausted:
            await self.bury_exhausted(outcome.exhausted)
        if outcome.finals:
            await self.finish(outcome.finals)
            self.stats.retries_exhausted += len(outcome.exhausted)

    async def retry(self, lease: Lease, policy: RetryPolicy, error: str) -> None:
        """A retryable failure with a retry left: back to the scheduler with the policy it waits by."""
        self.sessions.settle(lease.key)
        returned = messages_pb2.Assignment()
        returned.CopyFrom(lease.payload)
        stamp(returned.task, policy)
        await self.requeue(returned, lease.token, Reason.HANDLER_FAILED, error[:1000])

    async def bury_exhausted(self, items: Sequence[tuple[Lease, worker_pb2.TaskEvent]]) -> None:
        """Record failures with no retry left in `dead` (confirmed) so that an operator can replay them.

        Comes before their results; if a result is then not confirmed the worker reports again and
        the record is published again under the same message id, for whoever deduplicates.
        """
        await asyncio.gather(*(self._bury_one(lease.payload, event.error) for lease, event in items))

    async def _bury_one(self, assignment: messages_pb2.Assignment, error: str) -> None:
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
            await amqp.publish_until_confirmed(
                self.exchanges.dead,
                "",
                messages_pb2.DeadLetterBatch(dead=[dead]).SerializeToString(),
                headers={amqp.REASON_HEADER: Reason.RETRIES_EXHAUSTED.value},
                timeout=self.broker.confirm_timeout_s,
                message_id=f"{task.task_id}:{assignment.attempt}:{Reason.RETRIES_EXHAUSTED.value}",
            )
        except Unroutable:
            # The task still gets its FAILED result; only the operator's copy is missing.
            log.error(
                "the dead queue is missing; task %s is not recorded there", task.task_id, extra=_about(assignment)
            )
            return
        log.warning(
            "task %s failed with no retry left after attempt %d; recorded in %s",
            task.task_id,
            assignment.attempt,
            self.topology.dead,
            extra={**_about(assignment), "reason": Reason.RETRIES_EXHAUSTED.value},
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
            await amqp.publish_until_confirmed(
                self.exchanges.events,
                self.topology.result_key(task.reply_to),
                messages_pb2.TaskResultBatch(results=[result]).SerializeToString(),
                timeout=self.broker.confirm_timeout_s,
            )
        except Unroutable:
            self.stats.results_unclaimed += 1
            log.warning("expired result of task %s has no listener (client %s gone)", task.task_id, task.reply_to)
        finally:
            span.end()
        self.stats.expired += 1
        log.info("task %s expired: %s", task.task_id, result.error, extra=_about(assignment))

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
