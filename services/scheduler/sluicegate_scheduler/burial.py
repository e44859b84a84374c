"""Tasks that end without running: dead (out of attempts), rejected (malformed), expired (not started in time)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.trace import SpanKind

from sluicegate import lifecycle, telemetry
from sluicegate.expiry import expired_error
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.items import Pending
from sluicegate_scheduler.ledger import Ledger
from sluicegate_scheduler.outbox import Entry, Kind, Outbox
from sluicegate_scheduler.stats import SchedulerStats

log = logging.getLogger(__name__)

DEAD, REJECTED, EXPIRED = (
    messages_pb2.TASK_STATUS_DEAD,
    messages_pb2.TASK_STATUS_REJECTED,
    messages_pb2.TASK_STATUS_EXPIRED,
)
CANCELLED = messages_pb2.TASK_STATUS_CANCELLED
SPAN_NAMES = {DEAD: "dead", REJECTED: "reject", EXPIRED: "expire", CANCELLED: "cancel"}
K = messages_pb2.LifecycleEvent


class Burial:
    """Decides the entries that end a task here: a dead letter for operators, a result for its client.

    An item counts as done when its dead letter is confirmed (dead, rejected) or, for an expired
    task, its result; a result to a client that is gone counts as done too.
    """

    def __init__(
        self,
        outbox: Outbox,
        ledger: Ledger,
        stats: SchedulerStats,
        wall: Callable[[], int],
        on_event: Callable[[messages_pb2.LifecycleEvent], None],
    ) -> None:
        self.outbox, self.ledger, self.stats, self.wall = outbox, ledger, stats, wall
        self.on_event = on_event
        self.done: Callable[[Any], None] = lambda _source: None  # set by the core

    def bury(self, item: Pending, status: messages_pb2.TaskStatus.ValueType) -> None:
        task = self._trace(item, status)
        reason = item.history[-1].reason if item.history else "unknown"
        dead = messages_pb2.DeadLetter(task=task, reasons=item.history, at_ms=self.wall())
        # The client hears of it once operators can find it in the dead queue.
        result = self._result(task, status, item.history, item.attempt)
        self.outbox.add(Entry(Kind.DEAD, reason, dead, item, dead.ByteSize(), extra=(status, result)))
        if status == DEAD:
            log.warning(
                "task %s is dead after %d attempts (%s)",
                task.task_id,
                item.attempt - 1,
                reason,
                extra={"task_id": task.task_id},
            )

    def expire(self, item: Pending) -> None:
        """A task held here, or just taken, passed its schedule timeout: it ends, and never runs."""
        task = self._trace(item, EXPIRED)
        item.history.append(self._expiry(task, item.attempt))
        self.stats.expired += 1
        result = self._result(task, EXPIRED, item.history, item.attempt)
        if result is None:
            self.ledger.buried(item.key)
            self.done(item.source)
        else:
            self.outbox.add(Entry(Kind.RESULT, task.reply_to, result, item, result.ByteSize(), extra=task))

    def cancel(self, item: Pending, reason: str) -> None:
        """A task cancelled before it ran: it ends `cancelled`, and never runs."""
        task = self._trace(item, CANCELLED)
        item.history.append(self._cancellation(attempt=item.attempt, reason=reason))
        self.stats.cancelled += 1
        result = self._result(task, CANCELLED, item.history, item.attempt)
        if result is None:
            self.ledger.buried(item.key)
            self.done(item.source)
        else:
            result.error = reason or "cancelled"  # what the canceller said; the history keeps the rest
            self.outbox.add(Entry(Kind.RESULT, task.reply_to, result, item, result.ByteSize(), extra=task))

    def cancel_parked(self, task: messages_pb2.Task, attempt: int, reason: str) -> None:
        """A task parked in a lane or on the ladder is cancelled: end it now; its copy is dropped later."""
        self.ledger.buried((task.task_id, attempt))
        self.stats.cancelled += 1
        result = self._result(task, CANCELLED, [self._cancellation(attempt=attempt, reason=reason)], attempt)
        if result is not None:
            result.error = reason or "cancelled"
            self.outbox.add(Entry(Kind.RESULT, task.reply_to, result, None, result.ByteSize(), extra=task))

    def refuse(self, item: Pending, reason: Reason, detail: str) -> None:
        """A submission refused before it was taken (a reused id, a full tenant): REJECTED to its client.

        It is told apart from the task its id may belong to: it counts as attempt 0, which no real
        attempt is, so neither the ledger nor the task's record is touched.
        """
        self.stats.rejected += 1
        item.attempt = 0
        history = [messages_pb2.Requeue(reason=reason.value, detail=detail, at_ms=self.wall())]
        result = self._result(item.task, REJECTED, history, 1)
        if result is None:
            self.done(item.source)
            return
        result.error = detail
        self.outbox.add(Entry(Kind.RESULT, item.task.reply_to, result, item, result.ByteSize(), extra=None))

    def _cancellation(self, *, attempt: int, reason: str) -> messages_pb2.Requeue:
        return messages_pb2.Requeue(reason=Reason.CANCELLED.value, detail=reason, attempt=attempt, at_ms=self.wall())

    def expire_parked(self, task: messages_pb2.Task, attempt: int) -> None:
        """A task parked in a lane passed its deadline: end it now; its lane's copy is dropped later."""
        self.ledger.buried((task.task_id, attempt))
        self.stats.expired += 1
        result = self._result(task, EXPIRED, [self._expiry(task, attempt)], attempt)
        if result is not None:
            self.outbox.add(Entry(Kind.RESULT, task.reply_to, result, None, result.ByteSize(), extra=task))

    def _expiry(self, task: messages_pb2.Task, attempt: int) -> messages_pb2.Requeue:
        return messages_pb2.Requeue(
            reason=Reason.EXPIRED.value,
            detail=expired_error(task),
            attempt=attempt,
            at_ms=self.wall(),
        )

    def _record(self, result: messages_pb2.TaskResult, task: messages_pb2.Task) -> None:
        """The terminal event for the recorder, once the client's result (or the dead letter) is confirmed."""
        kind = {
            DEAD: K.KIND_DEAD,
            REJECTED: K.KIND_REJECTED,
            EXPIRED: K.KIND_EXPIRED,
            CANCELLED: K.KIND_CANCELLED,
        }.get(result.status)
        if kind is not None:
            event = lifecycle.task_event(
                kind, task, attempt=result.attempt, error=result.error, at_ms=result.finished_at_ms or self.wall()
            )
            self.on_event(event)

    def _result_of(self, item: Pending, status: messages_pb2.TaskStatus.ValueType) -> messages_pb2.TaskResult:
        reasons = "; ".join(f"{r.reason}: {r.detail}" if r.detail else r.reason for r in item.history[-5:])
        return messages_pb2.TaskResult(
            task_id=item.task.task_id, status=status, error=reasons, attempt=max(0, item.attempt - 1)
        )

    def _trace(self, item: Pending, status: messages_pb2.TaskStatus.ValueType) -> messages_pb2.Task:
        task = item.task
        span = telemetry.start(
            SPAN_NAMES[status],
            item.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(task.task_id, item.attempt - 1),
        )
        telemetry.fail(span, item.history[-1].reason if item.history else SPAN_NAMES[status])
        span.end()
        return task

    def _result(
        self,
        task: messages_pb2.Task,
        status: messages_pb2.TaskStatus.ValueType,
        history: Sequence[messages_pb2.Requeue],
        attempt: int,
    ) -> messages_pb2.TaskResult | None:
        """The result to tell the submitting client; None if there is nobody to tell."""
        if not task.reply_to:
            return None
        reasons = "; ".join(f"{r.reason}: {r.detail}" if r.detail else r.reason for r in history[-5:])
        result = messages_pb2.TaskResult(
            task_id=task.task_id,
            status=status,
            error=reasons,
            attempt=max(0, attempt - 1),
            submitted_at_ms=task.submitted_at_ms,
            finished_at_ms=self.wall(),
            history=history,
            trace=task.trace,
        )
        return result

    def confirmed(self, batch: Sequence[Entry], done: Callable[[Any], None]) -> None:
        for entry in batch:
            if entry.kind == Kind.RESULT and entry.extra is not None:
                self._record(entry.body, entry.extra)
            if entry.item is None:
                continue
            self.ledger.buried(entry.item.key)
            if entry.kind == Kind.DEAD:
                status, result = entry.extra
                self.stats.dead += status == DEAD
                if result is not None:
                    self.outbox.add(Entry(Kind.RESULT, entry.item.task.reply_to, result, None, extra=entry.item.task))
                else:
                    self._record(self._result_of(entry.item, status), task=entry.item.task)
            done(entry.item.source)
