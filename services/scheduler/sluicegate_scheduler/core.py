"""The scheduler's decisions, with no broker in sight: where each task goes, and what is done once confirmed.

The shell hands it what it consumed (submitted tasks, requeued attempts, parked and delayed items)
and runs `round()` whenever something changed; the core answers with entries in its outbox (assign,
park, delay, bury) and with the deliveries that may now be acked. A task that can be placed when it
arrives is assigned in that round; one that cannot is parked in its lane, never kept in memory at
the expense of others. Time is explicit (`clock` for intervals, `wall` for timestamps on the wire).
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sluicegate import amqp, lifecycle, retry
from sluicegate.bodies import TaskIds, check_assignment
from sluicegate.errors import InvalidInput
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate.validation import DEFAULT_MAX_PAYLOAD, check_task
from sluicegate.wire import now_ms
from sluicegate_scheduler.assignment import WorkerPool
from sluicegate_scheduler.burial import Burial
from sluicegate_scheduler.delays import rung_for
from sluicegate_scheduler.items import Origin, Pending, from_parked, to_parked
from sluicegate_scheduler.lanes import Lane, LaneBook, TenantCounts, arrival
from sluicegate_scheduler.ledger import Ledger, Standing, Verdict
from sluicegate_scheduler.limits import ConcurrencyLimits, RateLimits, Weights
from sluicegate_scheduler.outbox import Entry, Kind, Outbox
from sluicegate_scheduler.placement import Placement
from sluicegate_scheduler.stats import SchedulerStats

log = logging.getLogger(__name__)

# A worker that failed a dispatch for one of these is likely stalled or gone: others get its work first.
STALL_REASONS = frozenset(
    {Reason.LOCK_TIMEOUT, Reason.STREAM_STALLED, Reason.ACK_TIMEOUT, Reason.STREAM_BROKEN, Reason.WORKER_LOST}
)


@dataclass(frozen=True, slots=True)
class Config:
    prefix: str = "sluicegate"
    partition: int = 0  # which scheduler partition this is, of `partitions`
    partitions: int = 1
    eager_share: bool = False  # partitions claim idle slots rounded up (see WorkerPool.share)
    synthetic_cost: float = 0.0  # seconds of work added to each placement (benchmarks only)
    synthetic_wait: bool = False  # the synthetic cost blocks without using the CPU (a model of more cores)
    max_dispatch_attempts: int = 5
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    max_lanes: int = 1000
    max_waiting_per_tenant: int = 0  # tasks of one tenant waiting here or in its lanes; past it, REJECTED (0: none)
    lane_scan: int = 32  # how far past a blocked head a lane is searched for a task that can go
    hold_ms: int = 200  # the last stretch of a delay shorter than this is waited in memory
    requeue_hold: float = 1.0  # a requeued attempt waits this long ahead of its lane, then is parked
    worker_cooldown: float = 5.0
    lane_idle: float = 60.0  # an empty lane is deleted after this
    held_budget: int = 256 * 1024 * 1024  # bytes of tasks held in memory before lanes stop being read
    max_batch: int = 64
    concurrency: ConcurrencyLimits = field(default_factory=lambda: ConcurrencyLimits({}))
    rates: RateLimits = field(default_factory=lambda: RateLimits({}))
    fairness: Weights = field(default_factory=lambda: Weights({}))


class Core:
    def __init__(
        self,
        config: Config,
        pool: WorkerPool | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.pool = pool or WorkerPool(config.partitions, config.partition, eager=config.eager_share)
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random()
        self.book = LaneBook(amqp.Topology(config.prefix, config.partition).own, config.max_lanes)
        self.ledger = Ledger()
        self.outbox = Outbox(max_items=config.max_batch)
        self.stats = SchedulerStats()
        self.to_ack: list[amqp.Delivery] = []  # deliveries whose every item found its fate
        # Lifecycle events for whoever records task histories; nothing waits for them.
        self.on_event: Callable[[messages_pb2.LifecycleEvent], None] = lambda _event: None
        self.recording: Callable[[], bool] = lambda: False  # whether anyone keeps them (else not built)
        self.burial = Burial(self.outbox, self.ledger, self.stats, wall, self._record)
        self.burial.done = self.done
        self.placement = Placement(self, config)
        self._arrivals: list[Pending] = []  # held only until the end of the round they came in
        self._requeued: list[Pending] = []  # held ahead of their lanes, until hold_until
        self._timers: list[tuple[int, int, Pending]] = []  # (due ms, seq, item): last stretch of a delay
        self._timer_seq = 0
        self._held: dict[tuple[str, int], Pending] = {}
        # Parked items, by task id: (attempt, what a result needs of the task), to end one that expires
        # or is cancelled while it waits in the broker. Bounded: past it, it ends when its lane gives it back.
        self._parked_tasks: OrderedDict[str, tuple[int, messages_pb2.Task]] = OrderedDict()
        self.cancelled: OrderedDict[str, str] = OrderedDict()  # task id -> why: never to run
        self.wake_at: float | None = None  # when a limit refills or a timer is due
        self._warned: set[tuple[str, str]] = set()  # (tenant, action) waiting for anyone to serve it
        self.delayed = 0
        self.task_ids = TaskIds()  # what each recent id was submitted with: a reused id is refused
        self.tenants = TenantCounts(config.max_waiting_per_tenant)

    # What the shell consumed.

    def take_tasks(
        self, tasks: Sequence[messages_pb2.Task], source: amqp.Delivery, *, redelivered: bool = False
    ) -> None:
        """Submitted tasks, from an intake queue."""
        for task in tasks:
            self.stats.received += 1
            item = Pending(task=task, source=source, origin=Origin.INTAKE, trace=dict(task.trace), size=task.ByteSize())
            self._fence(item, redelivered)
            if self._cancelled(item) or self._reused(item) or self._seen(item):
                continue
            self.task_ids.note(task)
            try:
                check_task(task, self.config.max_payload_bytes)
            except InvalidInput as err:
                self.stats.rejected += 1
                item.history.append(
                    messages_pb2.Requeue(reason=Reason.INVALID.value, detail=str(err), at_ms=self.wall())
                )
                self.burial.bury(item, messages_pb2.TASK_STATUS_REJECTED)
                continue
            if not self.tenants.admit(task.tenant, self.book, self.clock()):
                self.ledger.forget(item.key)  # never taken: the same task submitted later is new
                detail = f"tenant {task.tenant} has {self.tenants.limit} tasks waiting already; submit again later"
                self.burial.refuse(item, Reason.OVER_LIMIT, detail)
                continue
            item.not_before_ms = task.run_at_ms
            if self.recording():
                self.on_event(
                    lifecycle.task_event(K.KIND_SUBMITTED, _light(task), at_ms=self.wall(), include_task=True)
                )
            self._admit(item)

    def take_requeued(
        self,
        assignments: Sequence[messages_pb2.Assignment],
        broker_reason: Reason | None,
        source: amqp.Delivery,
        *,
        redelivered: bool = False,
    ) -> None:
        """Attempts the dispatchers (or the broker, for a dead dispatcher) sent back."""
        for a in assignments:
            history = list(a.history)
            if broker_reason is not None:
                history.append(
                    messages_pb2.Requeue(
                        reason=broker_reason.value,
                        detail="dead-lettered by the broker",
                        worker_id=a.worker_id,
                        attempt=a.attempt,
                        at_ms=self.wall(),
                    )
                )
            reason = reason_of(history)
            # With partitions, a worker turned away what another partition claimed at the same time:
            # a lost race for a slot, not a task that cannot be dispatched, so it spends no attempt.
            contended = reason == Reason.NO_SLOT and self.config.partitions > 1
            item = Pending(
                task=a.task,
                source=source,
                origin=Origin.REQUEUE,
                attempt=a.attempt + 1,
                dispatch_failures=a.dispatch_failures + (reason.counts_as_dispatch_failure and not contended),
                run_failures=a.run_failures + (reason == Reason.HANDLER_FAILED),
                history=history,
                avoid=frozenset({a.worker_id}) if a.worker_id else frozenset(),
                trace=dict(a.trace) or dict(a.task.trace),
                size=a.task.ByteSize(),
            )
            self._fence(item, redelivered)
            if self._cancelled(item):
                continue
            if self._seen(item):
                self.stats.duplicate_requeues += 1
                continue
            try:
                check_assignment(a, self.config.max_payload_bytes)
            except InvalidInput as err:  # not what any dispatcher sends back: to `dead`, with the reason
                self._bury_invalid(item, err)
                continue
            self.stats.requeued[reason.value] += 1
            if self.recording():
                last = history[-1] if history else None
                self.on_event(
                    lifecycle.assignment_event(
                        K.KIND_REQUEUED, a, reason=reason.value, detail=last.detail if last else "", at_ms=self.wall()
                    )
                )
            if reason in STALL_REASONS and a.worker_id:
                self.pool.cool_down(a.worker_id, self.clock(), self.config.worker_cooldown)
            if reason == Reason.INVALID or item.dispatch_failures >= self.config.max_dispatch_attempts:
                self.burial.bury(item, messages_pb2.TASK_STATUS_DEAD)
                continue
            if reason == Reason.HANDLER_FAILED:
                policy = retry.effective_policy(a.task, None)
                wait = retry.backoff_delay(policy, item.run_failures, self.rng)
                item.not_before_ms = self.wall() + round(wait * 1000)
            self._admit(item)

    def take_parked(
        self,
        items: Sequence[messages_pb2.Parked],
        source: amqp.Delivery,
        origin: Origin,
        lane: Lane | None = None,
        *,
        redelivered: bool = False,
    ) -> None:
        """Items back from their lane (origin LANE) or from the delay ladder (origin DUE)."""
        if lane is not None:
            lane.taken(len(items))
        elif origin == Origin.DUE:
            self.delayed = max(0, self.delayed - len(items))
        for parked in items:
            item = from_parked(parked, source, origin)
            self._fence(item, redelivered)
            if self._cancelled(item) or self._seen(item):
                continue
            try:
                check_task(item.task, self.config.max_payload_bytes)
            except InvalidInput as err:  # not what this scheduler parks: to `dead`, with the reason
                self._bury_invalid(item, err)
                continue
            if origin == Origin.LANE and lane is not None:
                if self._expired(item):
                    continue
                self._hold(item, lane)
            else:
                self._admit(item)

    # Cancellation.

    def cancel(self, task_id: str, reason: str) -> None:
        """A task is cancelled: end it now if it waits here, and never let a copy of it run later."""
        if task_id in self.cancelled:
            return
        self.cancelled[task_id] = reason
        while len(self.cancelled) > 1_000_000:
            self.cancelled.popitem(last=False)
        for item in [i for k, i in self._held.items() if k[0] == task_id]:
            if item.holder is None and not any(t[2] is item for t in self._timers):
                continue  # on its way to a dispatcher: the dispatcher ends it
            self._timers = [t for t in self._timers if t[2] is not item]
            heapq.heapify(self._timers)
            self.unhold(item)
            self.burial.cancel(item, reason)
        parked = self._parked_tasks.pop(task_id, None)
        if parked is not None and self.ledger.standing((task_id, parked[0])) is Standing.PARKED:
            self.burial.cancel_parked(parked[1], parked[0], reason)

    def _cancelled(self, item: Pending) -> bool:
        reason = self.cancelled.get(item.task.task_id)
        if reason is None:
            return False
        if self.ledger.standing(item.key) is Standing.BURIED:
            self.done(item.source)  # ended already: this copy has nothing left to do
        else:
            self.burial.cancel(item, reason)
        return True

    def _fence(self, item: Pending, redelivered: bool) -> None:
        """A redelivered message this scheduler knows nothing of may have been placed by a leader before it.

        Such an attempt may already be running elsewhere: the item runs as the next attempt, so
        that the two are fenced apart (a late report of one never completes the other's). What this
        scheduler itself saw before a reconnect its ledger recognises; that keeps its number.
        """
        if redelivered and self.ledger.standing(item.key) is None:
            item.attempt += 1
        item.home = self.ledger.home(item.key)

    def _bury_invalid(self, item: Pending, err: InvalidInput) -> None:
        self.stats.rejected += 1
        item.history.append(messages_pb2.Requeue(reason=Reason.INVALID.value, detail=str(err), at_ms=self.wall()))
        self.burial.bury(item, messages_pb2.TASK_STATUS_DEAD)

    def _reused(self, item: Pending) -> bool:
        """A submission whose id another task, submitted before with other content, holds: REJECTED.

        The same content again (a publish retried, a client resubmitting) is a copy of that
        submission, which `_seen` settles: the first task's result answers it.
        """
        if self.ledger.standing(item.key) is None or not self.task_ids.reused(item.task):
            return False
        self.stats.reused_ids += 1
        detail = f"task id {item.task.task_id} is already used by another task; submit with a new id"
        self.burial.refuse(item, Reason.REUSED_ID, detail)
        return True

    def _seen(self, item: Pending) -> bool:
        """Settle a copy that is not new; True if it was one."""
        verdict = self.ledger.arrive(item.key, item.origin)
        if verdict is Verdict.NEW:
            return False
        if verdict is Verdict.DUPLICATE:
            self.stats.duplicate_tasks += 1
        self.done(item.source)
        return True

    # Where an item goes.

    def _admit(self, item: Pending) -> None:
        if self._expired(item):
            return
        now = self.wall()
        if item.not_before_ms > now:
            rung = rung_for(item.not_before_ms - now, self.config.hold_ms)
            if rung is None:
                self._timer_seq += 1
                heapq.heappush(self._timers, (item.not_before_ms, self._timer_seq, item))
                self._held[item.key] = item
                self.ledger.watch(item.key, item.deadline_ms)
                self.wake(self.clock() + (item.not_before_ms - now) / 1000)
            else:
                self.ledger.parked(item.key)
                self.outbox.add(Entry(Kind.DELAY, str(rung), self._parked_form(item, now), item, item.size))
            return
        lane = self.book.lane_for(item.task)
        if item.origin == Origin.REQUEUE:
            if self.pool.serves(item.task.tenant, item.task.action):
                item.hold_until = self.clock() + self.config.requeue_hold
                self._hold(item, lane, front=True)
                self._requeued.append(item)
            else:
                self.park(item, lane)
        elif lane.backlogged:
            self.park(item, lane)  # behind what waits already: first in, first out
        else:
            self._hold(item, lane)
            self._arrivals.append(item)

    def _hold(self, item: Pending, lane: Lane, *, front: bool = False) -> None:
        lane.hold(item, front=front)
        item.holder = lane
        self._held[item.key] = item
        self.ledger.watch(item.key, item.deadline_ms)

    def unhold(self, item: Pending) -> None:
        if item.holder is not None:
            item.holder.release(item)
            item.holder = None
        self._held.pop(item.key, None)

    def park(self, item: Pending, lane: Lane) -> None:
        self.unhold(item)
        self.ledger.parked(item.key)
        lane.park_started(item)
        lane.idle_since = None
        self.outbox.add(Entry(Kind.PARK, lane.name, self._parked_form(item, self.wall()), item, item.size))

    @staticmethod
    def _parked_form(item: Pending, now: int) -> messages_pb2.Parked:
        """The item as it waits on the wire. Its task now points into that copy, so the message it came
        in can be freed: a parked task is held once until its park is confirmed, not twice."""
        parked = to_parked(item, now)
        item.task = parked.task
        return parked

    def _expired(self, item: Pending) -> bool:
        deadline = item.deadline_ms
        if deadline and self.wall() >= deadline:
            self.unhold(item)
            self.burial.expire(item)
            return True
        return False

    def wake(self, at: float) -> None:
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at

    # A round: place what can be placed, park the arrivals that could not.

    def round(self) -> None:
        now = self.clock()
        self.wake_at = None
        self._fire_timers()
        self._expire_overdue()
        self.placement.run(now)
        for item in self._arrivals:
            if item.holder is not None:
                self.park(item, item.holder)
        self._arrivals.clear()
        keep = []
        for item in self._requeued:
            if item.holder is None:
                continue
            if now >= item.hold_until or not self.pool.serves(item.task.tenant, item.task.action):
                self.park(item, item.holder)
            else:
                keep.append(item)
                self.wake(item.hold_until)
        self._requeued = keep

    def _fire_timers(self) -> None:
        now = self.wall()
        while self._timers and self._timers[0][0] <= now:
            _, _, item = heapq.heappop(self._timers)
            self._held.pop(item.key, None)
            item.origin = Origin.TIMER
            self._admit(item)
        if self._timers:
            self.wake(self.clock() + (self._timers[0][0] - now) / 1000)

    def _expire_overdue(self) -> None:
        now = self.wall()
        for key, standing in self.ledger.overdue(now):
            if standing is Standing.HELD:
                item = self._held.get(key)
                if item is not None and (item.holder is not None or any(t[2] is item for t in self._timers)):
                    self._timers = [t for t in self._timers if t[2] is not item]
                    heapq.heapify(self._timers)
                    self.unhold(item)
                    self.burial.expire(item)
            else:
                parked = self._parked_tasks.get(key[0])
                if parked is not None and parked[0] == key[1]:  # its copy is dropped when its lane gives it back
                    del self._parked_tasks[key[0]]
                    self.burial.expire_parked(parked[1], key[1])
        deadline = self.ledger.next_deadline()
        if deadline is not None:
            self.wake(self.clock() + max(0, deadline - now) / 1000)

    @property
    def waiting(self) -> int:
        """Tasks waiting: in lanes (held or parked), on the delay ladder, or held for the last stretch of a delay."""
        return sum(lane.depth for lane in self.book) + self.delayed + len(self._timers)

    # Which lanes to read, and which to delete.

    def consumption(self) -> tuple[list[Lane], list[Lane]]:
        """Lanes to start reading and to stop reading: read a lane while it has tasks and someone serves it.

        Past the memory budget, lanes that already hold tasks stop being read until they placed them.
        """
        over = self.book.held_bytes > self.config.held_budget
        start, stop = [], []
        unserved = set()
        for lane in self.book:
            k = lane.key
            served = self.pool.serves(k.tenant, k.action)
            if not served and lane.depth:
                unserved.add((k.tenant, k.action))
            want = lane.ready and lane.backlogged and served and not (over and lane.held)
            if want and not lane.consuming:
                start.append(lane)
            elif lane.consuming and not want:
                stop.append(lane)
        for tenant, action in unserved - self._warned:
            log.warning(
                "tasks of tenant %s for action %r wait in a lane: no connected worker serves it", tenant, action
            )
        self._warned = unserved  # once per lane while it waits; again only after someone served it
        return start, stop

    def idle_lanes(self) -> list[Lane]:
        """Lanes empty for `lane_idle`: their queue can go (declared again when needed)."""
        now = self.clock()
        idle = []
        for lane in self.book:
            if not lane.empty or self.outbox.pending(Kind.PARK, lane.name):
                lane.idle_since = None
            elif lane.idle_since is None:
                lane.idle_since = now
            elif now - lane.idle_since >= self.config.lane_idle:
                idle.append(lane)
        return idle

    def lane_deleted(self, lane: Lane) -> None:
        if lane.empty and not self.outbox.pending(Kind.PARK, lane.name):
            self.book.remove(lane)
        else:  # something came for it meanwhile: declare it again before parking there
            lane.ready = False
            lane.idle_since = None

    # What the broker confirmed (or did not).

    def done(self, source: amqp.Delivery | None, count: int = 1) -> None:
        if source is not None and source.done(count):
            self.to_ack.append(source)

    def confirmed(self, kind: Kind, destination: str, batch: Sequence[Entry]) -> None:
        if kind == Kind.ASSIGN:
            self.placement.confirmed(batch)
        elif kind == Kind.PARK:
            lane = self.book.named(destination)
            items = [e.item for e in batch if e.item is not None]
            if lane is not None:
                lane.park_confirmed(len(items))
            why = self.placement.blocked.get(destination, "busy")
            if lane is not None and not self.pool.serves(lane.key.tenant, lane.key.action):
                why = "no_worker"
            for item in items:
                self._parked(item, why)
        elif kind == Kind.DELAY:
            self.delayed += len(batch)
            for entry in batch:
                if entry.item is not None:
                    self._parked(entry.item, "backoff" if entry.item.run_failures else "delayed")
        else:
            self.burial.confirmed(batch, self.done)

    def _record(self, event: messages_pb2.LifecycleEvent) -> None:
        if self.recording():
            self.on_event(event)

    def _parked(self, item: Pending, why: str) -> None:
        """Its park is confirmed: its delivery may go. (It counts as parked since the publish.)"""
        if item.origin != Origin.LANE and self.recording():
            self.on_event(
                lifecycle.task_event(K.KIND_WAITING, item.task, attempt=item.attempt - 1, reason=why, at_ms=self.wall())
            )
        self.done(item.source)
        reason = self.cancelled.get(item.task.task_id)
        if reason is not None:  # cancelled while its park was in flight: nothing else would end it now
            self.burial.cancel_parked(_essentials(item.task), item.attempt, reason)
            return
        self.ledger.watch(item.key, item.deadline_ms)
        self._parked_tasks[item.task.task_id] = (item.attempt, _essentials(item.task))
        while len(self._parked_tasks) > 200_000:
            self._parked_tasks.popitem(last=False)

    def failed(self, kind: Kind, destination: str, batch: list[Entry], *, unroutable: bool = False) -> None:
        """A publish was not confirmed. Assignments are placed again; everything else is sent again, first."""
        if kind == Kind.ASSIGN:
            self.placement.failed(destination, batch, unroutable=unroutable)
        elif kind == Kind.RESULT and unroutable:
            self.burial.confirmed(batch, self.done)  # the client is gone: nobody to tell
        else:
            if kind == Kind.PARK and unroutable:
                lane = self.book.named(destination)
                if lane is not None:
                    lane.ready = False  # its queue is gone: declare it again
            self.outbox.put_back((kind, destination), batch)

    def held_again(self, item: Pending) -> None:
        """An item whose assignment was not confirmed is back at the front of its lane."""
        lane = self.book.lane_for(item.task)
        self._hold(item, lane, front=True)
        if arrival(item.origin) or item.origin == Origin.REQUEUE:
            self._arrivals.append(item)

    def end_session(self) -> None:
        """The broker connection is gone: unsettled deliveries come again, so forget what they carried."""
        for entry, flying in self.outbox.clear():
            if entry.kind == Kind.ASSIGN:
                self.placement.undo(entry)
                if flying and entry.item is not None:
                    self.ledger.sent(entry.item.key, entry.body.worker_id)
            elif entry.kind in (Kind.PARK, Kind.DELAY) and entry.item is not None:
                if flying:  # maybe parked: its delivery comes again as the same attempt as the lane's copy
                    self.ledger.sent(entry.item.key, "")
                else:  # never parked: its delivery decides again
                    self.ledger.forget(entry.item.key)
        self.book.clear_held()
        self.ledger.forget_held()
        self._arrivals.clear()
        self._requeued.clear()
        self._timers.clear()
        self._held.clear()
        self.to_ack.clear()


def reason_of(history: Iterable[messages_pb2.Requeue]) -> Reason:
    last = None
    for last in history:  # noqa: B007 - the last record is the reason
        pass
    if last is None:
        return Reason.LEASE_EXPIRED
    try:
        return Reason(last.reason)
    except ValueError:
        return Reason.LEASE_EXPIRED


K = messages_pb2.LifecycleEvent
RECORDED_PAYLOAD = 64 * 1024  # a larger payload is left out of the SUBMITTED event (the task is in its queue)


def _light(task: messages_pb2.Task) -> messages_pb2.Task:
    return task if len(task.payload) <= RECORDED_PAYLOAD else _without_payload(task)


def _without_payload(task: messages_pb2.Task) -> messages_pb2.Task:
    copy = messages_pb2.Task()
    copy.CopyFrom(task)
    copy.ClearField("payload")
    return copy


def _essentials(task: messages_pb2.Task) -> messages_pb2.Task:
    """What ending a task that waits in the broker needs of it: whom to tell, and its trace."""
    return messages_pb2.Task(
        task_id=task.task_id,
        tenant=task.tenant,
        action=task.action,
        reply_to=task.reply_to,
        submitted_at_ms=task.submitted_at_ms,
        schedule_timeout_ms=task.schedule_timeout_ms,
        trace=task.trace,
    )
