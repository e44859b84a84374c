"""What a worker's events mean, decided next to carrying it out.

A receipt is answered at once: accepted while the session holds that attempt's lease and its start
deadline has not passed, stale otherwise (the worker then drops the attempt, never runs it). A
terminal report frees the worker's slot at once and is carried out by the Settler: a result for the
client, a retry for the scheduler, or, once no retry is left, a record in `dead` and the FAILED
result. Its verdict is answered when that is confirmed, on whatever stream the session has then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from enum import Enum
from typing import Any

from sluicegate import lifecycle
from sluicegate.bodies import valid_cancels
from sluicegate.expiry import is_expired
from sluicegate.retry import RetryPolicy, effective_policy
from sluicegate.v1 import worker_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.sessions import Lease, Sessions, WorkerSession
from sluicegate_dispatcher.settlement import Settler
from sluicegate_dispatcher.stats import DispatcherStats

log = logging.getLogger(__name__)

Event = worker_pb2.TaskEvent
Verdict = worker_pb2.EventVerdict
TERMINAL = (Event.KIND_COMPLETED, Event.KIND_FAILED, Event.KIND_CANCELLED)
RECEIPTS = (Event.KIND_RECEIVED, Event.KIND_STARTED)
MAX_EXTEND = 24 * 3600.0  # one progress report extends a deadline by at most a day


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


class Reports:
    def __init__(
        self,
        *,
        sessions: Sessions,
        settler: Settler,
        stats: DispatcherStats,
        metrics: DispatcherMetrics,
        emitter: lifecycle.LifecycleEmitter,
        dispatcher_id: str,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        run_grace: float = 5.0,
        cancel_grace: float = 5.0,
    ) -> None:
        self.sessions, self.settler, self.stats, self.metrics = sessions, settler, stats, metrics
        self.lifecycle, self.dispatcher_id, self.clock, self.spawn = emitter, dispatcher_id, clock, spawn
        self.run_grace, self.cancel_grace = run_grace, cancel_grace

    def on_events(self, session: WorkerSession, events: Sequence[worker_pb2.TaskEvent]) -> list[Verdict]:
        """The verdicts that can be given now; those of finished attempts follow once they are settled."""
        verdicts = []
        finished: list[tuple[Lease, worker_pb2.TaskEvent]] = []
        for event in events:
            verdict = self._decide(session, event, finished)
            if verdict is not None:
                verdicts.append(Verdict(task_id=event.task_id, attempt=event.attempt, verdict=verdict))
        if finished:
            self.spawn(self._finish_all(finished))
        return verdicts

    def _decide(
        self,
        session: WorkerSession,
        event: worker_pb2.TaskEvent,
        finished: list[tuple[Lease, worker_pb2.TaskEvent]],
    ) -> Verdict.Verdict.ValueType | None:
        if not event.task_id or event.attempt < 1 or event.kind not in (*RECEIPTS, *TERMINAL, Event.KIND_PROGRESS):
            return Verdict.VERDICT_INVALID
        key = (event.task_id, event.attempt)
        lease = self.sessions.holder(key, session)
        if lease is None:
            if event.kind in TERMINAL and self.sessions.finished_before(key):
                return Verdict.VERDICT_ACCEPTED  # sent again after a reconnect: it was settled already
            self.stats.stale_reports += 1
            return Verdict.VERDICT_STALE
        if lease.finishing:
            # The same report again after a reconnect: its verdict comes when the first is settled.
            return None if event.kind in TERMINAL else Verdict.VERDICT_STALE
        if event.kind in RECEIPTS:
            return self._receipt(session, lease)
        if event.kind == Event.KIND_PROGRESS:
            self.sessions.extend(lease, min(MAX_EXTEND, event.extend_ms / 1000) + self.run_grace, self.clock())
            return Verdict.VERDICT_ACCEPTED
        self.sessions.acknowledge(lease)
        self.sessions.finishing(lease)
        if event.kind == Event.KIND_CANCELLED:
            self.spawn(self._cancelled(lease, lease.cancelling or event.error or "cancelled on the worker", event))
            return None
        task = lease.payload.task
        policy = effective_policy(task, session.action_options.get(task.action))
        if fate_of(event, lease.payload.run_failures, policy) is Fate.FINISH:
            finished.append((lease, event))  # the common case: settled together, below
        else:
            self.spawn(self._finish(lease, event, policy))
        return None

    def _receipt(self, session: WorkerSession, lease: Lease) -> Verdict.Verdict.ValueType:
        if lease.cancelling and not lease.received:
            return Verdict.VERDICT_STALE  # cancelled before it started: the worker drops it
        if not lease.received and is_expired(lease.payload.task, now_ms()):
            self.sessions.finishing(lease)  # too late to start: the worker drops it, the client hears EXPIRED
            self.spawn(self.settler.expire_lease(lease))
            return Verdict.VERDICT_STALE
        if self.sessions.acknowledge(lease):
            timeout_ms = lease.payload.task.timeout_ms
            if timeout_ms:  # enforced here, whatever the worker does: its own timeout, then a grace
                self.sessions.started(lease, self.clock() + timeout_ms / 1000 + self.run_grace)
            self.metrics.receipt_ack.observe(max(0.0, self.clock() - lease.taken_at))
            if self.lifecycle.wanted:
                self.lifecycle.emit(
                    lifecycle.assignment_event(
                        lifecycle.K.KIND_STARTED,
                        lease.payload,
                        worker_id=session.worker_id,
                        dispatcher_id=self.dispatcher_id,
                    )
                )
        return Verdict.VERDICT_ACCEPTED

    # Cancellations and deadlines.

    def on_cancels(self, cancels: Sequence[Any]) -> None:
        """Cancellations from the stream: what waits here ends at once, what runs is told to stop."""
        now = self.clock()
        good, bad = valid_cancels(cancels)
        self.stats.invalid_cancels += bad
        for cancel in good:
            for lease in self.sessions.cancel(cancel.task_id, cancel.reason):
                if lease.finishing or lease.cancelling:
                    continue
                if not lease.forwarded:  # still queued here: never sent
                    self.sessions.finishing(lease)
                    self.spawn(self.settler.cancel_lease(lease, cancel.reason or "cancelled"))
                else:
                    self._stop(lease, cancel.reason or "cancelled", now)

    def _stop(self, lease: Lease, reason: str, now: float) -> None:
        """Tell the worker to stop the attempt; it is ended without the worker after the grace."""
        self.sessions.stopping(lease, reason, now + self.cancel_grace)
        stream = lease.session.stream
        if stream is not None:
            stream.tell([_control(lease, reason)])

    def retell(self, session: WorkerSession) -> None:
        """A worker came back on a new stream: it is told again what it must stop."""
        controls = [_control(lease, lease.cancelling) for lease in session.leases.values() if lease.cancelling]
        if controls and session.stream is not None:
            session.stream.tell(controls)

    def sweep(self) -> None:
        """Queued attempts past their start deadline expire; past their grace, stopped attempts end
        cancelled; past their run deadline, attempts fail."""
        now = self.clock()
        wall = now_ms()
        for lease in self.sessions.expired_queued(lambda lease: is_expired(lease.payload.task, wall)):
            self.spawn(self.settler.expire_lease(lease))  # queued behind busy slots past its start deadline
        for lease in self.sessions.overdue_cancels(now):
            self.sessions.finishing(lease)
            self.spawn(self.settler.cancel_lease(lease, lease.cancelling))
        for lease in self.sessions.overdue_runs(now):
            task = lease.payload.task
            error = f"timed out: not finished within {task.timeout_ms} ms (and a {self.run_grace:g} s grace)"
            self.stats.timed_out += 1
            stream = lease.session.stream
            if stream is not None:
                stream.tell([_control(lease, "out of time")])
            # The worker may keep running it; whatever it reports later is stale.
            event = Event(
                task_id=task.task_id, attempt=lease.key[1], kind=Event.KIND_FAILED, error=error, retryable=True
            )
            self.sessions.acknowledge(lease)
            self.sessions.finishing(lease)
            policy = effective_policy(task, lease.session.action_options.get(task.action))
            self.spawn(self._finish(lease, event, policy))

    async def _cancelled(self, lease: Lease, reason: str, event: worker_pb2.TaskEvent) -> None:
        await self.settler.cancel_lease(lease, reason)
        _accepted([(lease, event)])

    async def _finish_all(self, finished: list[tuple[Lease, worker_pb2.TaskEvent]]) -> None:
        await self.settler.finish_many(finished)
        _accepted([(lease, event) for lease, event in finished])

    async def _finish(self, lease: Lease, event: worker_pb2.TaskEvent, policy: RetryPolicy) -> None:
        fate = fate_of(event, lease.payload.run_failures, policy)
        if fate is Fate.RETRY:
            await self.settler.retry(lease, policy, event.error)
        else:
            if fate is Fate.EXHAUSTED:
                await self.settler.bury_exhausted(lease, event.error)
            await self.settler.finish(lease, event)
        _accepted([(lease, event)])


def _control(lease: Lease, reason: str) -> worker_pb2.Control:
    return worker_pb2.Control(
        kind=worker_pb2.Control.KIND_CANCEL, task_id=lease.key[0], attempt=lease.key[1], reason=reason
    )


def _accepted(finished: list[tuple[Lease, worker_pb2.TaskEvent]]) -> None:
    """Tell each worker its reports were carried out, on whatever stream its session has now."""
    by_stream: dict[int, tuple[Any, list[Verdict]]] = {}
    for lease, event in finished:
        stream = lease.session.stream
        if stream is not None:
            verdict = Verdict(task_id=event.task_id, attempt=event.attempt, verdict=Verdict.VERDICT_ACCEPTED)
            by_stream.setdefault(id(stream), (stream, []))[1].append(verdict)
    for stream, verdicts in by_stream.values():
        stream.answer(verdicts)
