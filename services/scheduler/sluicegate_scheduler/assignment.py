"""The scheduler's pure core: its view of workers, the tasks waiting, and who gets which task."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class WorkerView:
    """What the scheduler believes about one worker session."""

    worker_id: str
    session_id: str
    dispatcher_id: str
    tenant: str
    actions: frozenset[str]
    labels: dict[str, str]
    slots: int
    reported_free: int
    reported_received: int
    ready: bool
    sent: int = 0  # assignments this scheduler published to the session

    @property
    def in_transit(self) -> int:
        """Assignments published but not yet consumed by the dispatcher when it last reported."""
        return max(0, self.sent - self.reported_received)

    @property
    def free(self) -> int:
        return max(0, self.reported_free - self.in_transit) if self.ready else 0

    def serves(self, tenant: str, action: str, labels: dict[str, str]) -> bool:
        return (
            self.tenant == tenant and action in self.actions and all(self.labels.get(k) == v for k, v in labels.items())
        )


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker as a dispatcher's state snapshot describes it (wire-free)."""

    worker_id: str
    session_id: str
    tenant: str
    actions: Iterable[str]
    labels: dict[str, str]
    slots: int
    free_slots: int
    ready: bool
    received: int


@dataclass(slots=True)
class _DispatcherView:
    seq: int
    seen_at: float
    draining: bool
    workers: dict[str, WorkerView] = field(default_factory=dict)


class WorkerPool:
    """The scheduler's view of every worker, replaced per dispatcher by each state snapshot."""

    def __init__(self) -> None:
        self._dispatchers: dict[str, _DispatcherView] = {}
        self._rotation = itertools.count()
        self._lanes: dict[tuple[str, str], list[WorkerView]] = {}
        self._cooling: dict[str, tuple[float, int]] = {}  # worker id -> (last resort until, strikes)

    def __iter__(self) -> Iterator[WorkerView]:
        for view in self._dispatchers.values():
            yield from view.workers.values()

    def __len__(self) -> int:
        return sum(len(v.workers) for v in self._dispatchers.values())

    def update(self, dispatcher_id: str, seq: int, draining: bool, workers: Iterable[WorkerReport], now: float) -> bool:
        """Apply a snapshot; older ones (by seq) are ignored. Returns True if applied."""
        old = self._dispatchers.get(dispatcher_id)
        if old is not None and seq <= old.seq and seq != 0:
            old.seen_at = now
            return False
        fresh = _DispatcherView(seq=seq, seen_at=now, draining=draining)
        for w in workers:
            previous = old.workers.get(w.session_id) if old else None
            fresh.workers[w.session_id] = WorkerView(
                worker_id=w.worker_id,
                session_id=w.session_id,
                dispatcher_id=dispatcher_id,
                tenant=w.tenant,
                actions=frozenset(w.actions),
                labels=dict(w.labels),
                slots=w.slots,
                reported_free=w.free_slots,
                reported_received=w.received,
                ready=w.ready and not draining,
                # Never below what the dispatcher consumed: a redelivered or re-published assignment
                # is consumed twice, and a `sent` left behind would read as nothing in transit forever.
                sent=max(previous.sent if previous else 0, w.received),
            )
        self._dispatchers[dispatcher_id] = fresh
        self._lanes.clear()
        return True

    def _lane(self, tenant: str, action: str) -> list[WorkerView]:
        """The workers of a tenant that serve an action, indexed once per change of the view."""
        lane = self._lanes.get((tenant, action))
        if lane is None:
            lane = self._lanes[(tenant, action)] = [w for w in self if w.tenant == tenant and action in w.actions]
        return lane

    def forget(self, dispatcher_id: str) -> None:
        self._dispatchers.pop(dispatcher_id, None)
        self._lanes.clear()

    def forget_silent(self, now: float, stale_after: float) -> list[str]:
        """Drop dispatchers not heard from within `stale_after` seconds; returns their ids."""
        gone = [d for d, v in self._dispatchers.items() if now - v.seen_at > stale_after]
        for d in gone:
            del self._dispatchers[d]
        if gone:
            self._lanes.clear()
        return gone

    def cool_down(self, worker_id: str, now: float, base: float, longest: float = 60.0) -> None:
        """A worker that just failed a dispatch (stalled, lost) gets work only as a last resort for a while.

        The while doubles with each strike, so a worker that keeps stalling keeps losing its share;
        a worker that stayed clear of trouble for `longest` starts again from `base`.
        """
        until, strikes = self._cooling.get(worker_id, (0.0, 0))
        if now > until + longest:
            strikes = 0
        if now < until and strikes:
            return  # the failures of one episode count once
        self._cooling[worker_id] = (now + min(longest, base * 2**strikes), strikes + 1)

    def pick(
        self,
        tenant: str,
        action: str,
        labels: dict[str, str],
        avoid: frozenset[str] = frozenset(),
        now: float = 0.0,
    ) -> WorkerView | None:
        """The eligible worker with the largest share of free slots; ties go round-robin.

        A worker in `avoid` (it failed this task before) is used only when no other can take it.
        """
        best: WorkerView | None = None
        best_score = -1.0
        fallback: WorkerView | None = None
        workers = self._lane(tenant, action)
        # Start the scan at a rotating offset and keep the first best: equal workers take turns.
        start = next(self._rotation) % len(workers) if workers else 0
        for w in workers[start:] + workers[:start]:
            free = w.free
            if free <= 0 or not w.serves(tenant, action, labels):
                continue
            if w.worker_id in avoid or self._cooling.get(w.worker_id, (0.0, 0))[0] > now:
                fallback = fallback or w
                continue
            score = free / w.slots  # the share of free slots spreads load
            if score > best_score:
                best, best_score = w, score
        return best or fallback

    def assigned(self, worker: WorkerView) -> None:
        worker.sent += 1

    def unassigned(self, worker: WorkerView) -> None:
        """Take back an assignment that was never published, on the worker's current view."""
        view = self._dispatchers.get(worker.dispatcher_id)
        current = view.workers.get(worker.session_id) if view else None
        if current is not None:
            current.sent = max(0, current.sent - 1)


@dataclass(order=True, slots=True)
class _Entry:
    priority: int  # negated: the heap pops the highest first
    band: int  # 0 for items put back at the front, 1 for new arrivals
    seq: int
    item: Any = field(compare=False)


class Waiting:
    """Tasks waiting for a worker, per (tenant, action), highest priority first, then oldest first."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], list[_Entry]] = {}
        self._seq = itertools.count()
        self._size = 0
        self._taken: dict[int, int] = {}  # id of a popped item -> its arrival order, until placed

    def __len__(self) -> int:
        return self._size

    def push(self, tenant: str, action: str, priority: int, item: Any) -> None:
        heapq.heappush(self._queues.setdefault((tenant, action), []), _Entry(-priority, 1, next(self._seq), item))
        self._size += 1

    def lanes(self) -> list[tuple[str, str]]:
        return [k for k, q in self._queues.items() if q]

    def peek(self, key: tuple[str, str]) -> Any | None:
        queue = self._queues.get(key)
        return queue[0].item if queue else None

    def pop(self, key: tuple[str, str]) -> Any:
        queue = self._queues[key]
        entry = heapq.heappop(queue)
        if not queue:
            del self._queues[key]
        self._size -= 1
        self._taken[id(entry.item)] = entry.seq
        return entry.item

    def placed(self, item: Any) -> None:
        """Forget a popped item for good: it found a worker."""
        self._taken.pop(id(item), None)

    def requeue_front(self, key: tuple[str, str], item: Any, priority: int) -> None:
        """Put a popped item back ahead of new arrivals of its priority, in its original arrival order."""
        seq = self._taken.pop(id(item), None)
        heapq.heappush(
            self._queues.setdefault(key, []), _Entry(-priority, 0, next(self._seq) if seq is None else seq, item)
        )
        self._size += 1
