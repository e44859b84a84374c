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
TERMINAL = (Event.KIND_COMPLETED, Event.KIND_FAILED)
RECEIPTS = (Event.KIND_RECEIVED, Event.KIND_STARTED)


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
    ) -> None:
        self.sessions, self.settler, self.stats, self.metrics = sessions, settler, stats, metrics
        self.lifecycle, self.dispatcher_id, self.clock, self.spawn = emitter, dispatcher_id, clock, spawn

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
        if not event.task_id or event.attempt < 1 or event.kind not in (*RECEIPTS, *TERMINAL):
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
        self.sessions.acknowledge(lease)
        self.sessions.finishing(lease)
        task = lease.payload.task
        policy = effective_policy(task, session.action_options.get(task.action))
        if fate_of(event, lease.payload.run_failures, policy) is Fate.FINISH:
            finished.append((lease, event))  # the common case: settled together, below
        else:
            self.spawn(self._finish(lease, event, policy))
        return None

    def _receipt(self, session: WorkerSession, lease: Lease) -> Verdict.Verdict.ValueType:
        if not lease.received and is_expired(lease.payload.task, now_ms()):
            self.sessions.finishing(lease)  # too late to start: the worker drops it, the client hears EXPIRED
            self.spawn(self.settler.expire_lease(lease))
            return Verdict.VERDICT_STALE
        if self.sessions.acknowledge(lease):
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
