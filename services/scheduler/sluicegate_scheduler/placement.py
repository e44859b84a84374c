"""Placing held tasks on workers: priority first, then fair shares between keys, then arrival order (pure).

Among the lanes of one (tenant, action) - the tasks waiting for the same workers - a higher
priority always goes first. Lanes of one priority share the free slots by deficit round robin,
each taking as many turns as its fairness key's weight before the next; the turn carries over from
one round to the next, so a slot that frees alone still goes to whoever is next. Within a lane the
oldest task that can go goes; a lane of one concurrency key at its cap, or out of rate tokens, is
passed over as a whole.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

from opentelemetry.trace import Span, SpanKind

from sluicegate import lifecycle, telemetry
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.assignment import KeyScope, WorkerView
from sluicegate_scheduler.items import Pending
from sluicegate_scheduler.lanes import Lane
from sluicegate_scheduler.outbox import Entry, Kind

if TYPE_CHECKING:
    from sluicegate_scheduler.core import Config, Core

K = messages_pb2.LifecycleEvent


class Placement:
    def __init__(self, core: Core, config: Config) -> None:
        self._core = core
        self._config = config
        self._cursor: dict[tuple[str, str, int], str] = {}  # whose turn it is, by lane name
        self._sticky: OrderedDict[tuple[str, str], str] = OrderedDict()  # (tenant, key) -> worker id
        self.blocked: dict[str, str] = {}  # lane name -> why it waits ("no_worker", "at_limit", "busy")

    def run(self, now: float) -> None:
        core = self._core
        self.blocked.clear()
        for tenant, action in core.book.works():
            lanes = [lane for lane in core.book.of_work(tenant, action) if lane.held]
            if not lanes:
                continue
            if not core.pool.serves(tenant, action):
                for lane in lanes:
                    self.blocked[lane.name] = "no_worker"
                continue
            for priority in sorted({lane.key.priority for lane in lanes}, reverse=True):
                self._share([lane for lane in lanes if lane.key.priority == priority], now)

    def _share(self, lanes: list[Lane], now: float) -> None:
        """Deficit round robin over the lanes of one priority, resuming where the last round stopped."""
        lanes.sort(key=lambda lane: lane.name)
        first = lanes[0].key
        group = (first.tenant, first.action, first.priority)
        turn = self._cursor.get(group, "")
        index = next((i for i, lane in enumerate(lanes) if lane.name >= turn), 0)
        weight = self._config.fairness
        blocked: set[str] = set()
        while len(blocked) < len(lanes):
            lane = lanes[index]
            if lane.name in blocked:
                index = (index + 1) % len(lanes)
                continue
            if lane.deficit <= 0:
                lane.deficit = weight(lane.key.fairness_key)
            if not self._place_one(lane, now):
                blocked.add(lane.name)
                index = (index + 1) % len(lanes)
                continue
            lane.deficit -= 1
            if lane.deficit <= 0:
                index = (index + 1) % len(lanes)
        self._cursor[group] = lanes[index].name

    def _place_one(self, lane: Lane, now: float) -> bool:
        """Place the oldest task of the lane that can go now; False if none can."""
        core = self._core
        key = lane.key
        limits, rates = self._config.concurrency, self._config.rates
        for item in islice(lane.held, self._config.lane_scan):
            task = item.task
            scope: KeyScope | None = (task.tenant, task.action, task.concurrency_key) if task.concurrency_key else None
            if scope is not None and limits:
                cap = limits.cap(task.action, task.concurrency_key)
                if cap is not None and core.pool.running(scope) >= cap:
                    self.blocked[lane.name] = "at_limit"
                    if key.overflow:
                        continue
                    return False
            wait = rates.wait(task.tenant, task.action, task.concurrency_key, now) if rates else 0.0
            if wait > 0:
                self.blocked[lane.name] = "at_limit"
                core.wake(now + wait)
                if key.overflow:
                    continue
                return False
            sticky = self._sticky.get((task.tenant, task.sticky_key), "") if task.sticky_key else ""
            sticky = item.home or sticky  # where this very attempt may already be
            preferred = [(p.key, p.value, p.weight) for p in task.preferred] if task.preferred else ()
            worker = core.pool.pick(
                task.tenant,
                task.action,
                dict(task.labels) if task.labels else {},
                item.avoid,
                now,
                preferred=preferred,
                sticky=sticky,
            )
            if worker is None:
                self.blocked.setdefault(lane.name, "busy")
                if task.labels or sticky or key.overflow:
                    continue  # another task of the lane may fit another worker
                return False
            self._place(item, worker, scope, now)
            return True
        return False

    def _place(self, item: Pending, worker: WorkerView, scope: KeyScope | None, now: float) -> None:
        core = self._core
        task = item.task
        core.unhold(item)
        if self._config.synthetic_cost:
            _burn(self._config.synthetic_cost, wait=self._config.synthetic_wait)
        core.pool.assigned(worker, scope)
        if self._config.rates:
            self._config.rates.take(task.tenant, task.action, task.concurrency_key, now)
        if task.sticky_key:
            self._sticky[(task.tenant, task.sticky_key)] = worker.worker_id
            self._sticky.move_to_end((task.tenant, task.sticky_key))
            while len(self._sticky) > 100_000:
                self._sticky.popitem(last=False)
        assignment, span = self._assignment(item, worker)
        core.outbox.add(
            Entry(Kind.ASSIGN, worker.dispatcher_id, assignment, item, assignment.ByteSize(), (worker, scope, span))
        )

    def _assignment(self, item: Pending, worker: WorkerView) -> tuple[messages_pb2.Assignment, Span]:
        span = telemetry.start(
            f"{'reassign' if item.attempt > 1 else 'assign'} {item.task.action}",
            item.trace,
            kind=SpanKind.PRODUCER,
            attributes=telemetry.task_attributes(
                item.task.task_id,
                item.attempt,
                **{
                    "sluicegate.worker.id": worker.worker_id,
                    "sluicegate.requeue.reason": item.history[-1].reason if item.history else None,
                    "messaging.destination.name": f"{self._config.prefix}.assign",
                    "messaging.rabbitmq.destination.routing_key": worker.dispatcher_id,
                    "messaging.operation.type": "publish",
                },
            ),
        )
        assignment = messages_pb2.Assignment(
            task=item.task,
            attempt=item.attempt,
            worker_id=worker.worker_id,
            session_id=worker.session_id,
            dispatcher_id=worker.dispatcher_id,
            dispatch_failures=item.dispatch_failures,
            run_failures=item.run_failures,
            history=item.history,
            assigned_at_ms=self._core.wall(),
            partition=self._config.partition,
        )
        telemetry.carry(span, assignment.trace)
        return assignment, span

    # What the broker said about published assignments.

    def confirmed(self, batch: Sequence[Entry]) -> None:
        core = self._core
        core.stats.assigned += len(batch)
        for entry in batch:
            _, _, span = entry.extra
            span.end()
            if core.recording():
                core.on_event(lifecycle.assignment_event(K.KIND_ASSIGNED, entry.body, at_ms=core.wall()))
            if entry.item is not None:
                core.ledger.placed(entry.item.key)
                core.done(entry.item.source)

    def failed(self, dispatcher_id: str, batch: Sequence[Entry], *, unroutable: bool) -> None:
        """Not confirmed: back to the front of their lanes. An unroutable inbox means that dispatcher is gone;
        any other failure may have delivered them, so each goes to the same worker again as the same
        attempt, where the dispatcher recognises a copy of what it holds or settled."""
        core = self._core
        if unroutable:
            core.stats.unroutable_assignments += len(batch)
            core.pool.forget(dispatcher_id)
        for entry in reversed(batch):
            self.undo(entry)
            if entry.item is not None:
                if not unroutable:  # a lost confirm: it may be at that dispatcher, so it goes there again
                    entry.item.home = entry.body.worker_id
                    core.ledger.sent(entry.item.key, entry.body.worker_id)
                core.held_again(entry.item)

    def undo(self, entry: Entry) -> None:
        worker, scope, span = entry.extra
        telemetry.fail(span, "assignment not confirmed")
        span.end()
        self._core.pool.unassigned(worker, scope)
        if entry.item is not None:
            task = entry.item.task
            self._config.rates.give_back(task.tenant, task.action, task.concurrency_key, self._core.clock())


def _burn(seconds: float, *, wait: bool) -> None:
    """A fixed cost per placement, to make the scheduler the bottleneck in a benchmark.

    Spent on the CPU (a busy loop), or, with `wait`, blocking the event loop without using it: what
    the scheduler would do with a core of its own while others use theirs.
    """
    if wait:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
