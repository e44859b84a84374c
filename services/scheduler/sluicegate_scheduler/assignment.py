"""The scheduler's view of workers and who gets which task (pure).

The view comes from the dispatchers' state snapshots; between two snapshots the scheduler counts
what it published itself (`sent` against the dispatcher's `received`), so a burst never
over-commits a worker, and the same ledger counts running tasks per concurrency key.

With P scheduler partitions assigning to the same workers, each partition counts only its own
assignments (the dispatcher reports `received` per partition) and claims only its part of the
free slots each report shows (`claim`). What an overshoot sends waits in the dispatcher's queue
room or comes back as NO_SLOT, and never reaches the worker (the dispatcher writes to a worker
only into a free slot).
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

PRINCIPAL = "principal:"  # cooling keys of principals, apart from worker ids
KeyScope = tuple[str, str, str]  # (tenant, action, concurrency key)
Preference = tuple[str, str, int]  # (label key, value, weight)


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
    prefetch: int = 0  # of reported_free, the room that only queues at the dispatcher behind busy slots
    principal: str = ""  # who stands behind the session; a stall cools all of its sessions
    leases: int = 0  # assignments it held when its dispatcher last reported (forwarded or queued there)
    sent: int = 0  # assignments this scheduler published to the session
    keyed: deque[tuple[int, KeyScope]] = field(default_factory=deque)  # (sent at, scope) not yet reported

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

    def preference(self, preferred: Sequence[Preference]) -> int:
        return sum(weight for key, value, weight in preferred if self.labels.get(key) == value)


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
    prefetch: int = 0  # of free_slots, how many only queue at the dispatcher
    principal: str = ""
    leases: int = 0
    acknowledged: int = 0  # receipts the session has given


# A full snapshot further ahead than this of the last one applied (same instance) is not believed:
# a dispatcher publishes a few thousand a second at most, and one forged seq near 2^64 would
# otherwise make every later honest one look old.
MAX_SEQ_JUMP = 10_000_000


def received_of(total: int, by_partition: Sequence[int], partition: int) -> int:
    """What a dispatcher consumed for a session from one partition (`total` is all partition 0's until split)."""
    if not by_partition:
        return total if partition == 0 else 0
    return by_partition[partition] if partition < len(by_partition) else 0


@dataclass(slots=True)
class _DispatcherView:
    seq: int
    seen_at: float
    draining: bool
    epoch: str = ""
    workers: dict[str, WorkerView] = field(default_factory=dict)
    key_leases: Counter[KeyScope] = field(default_factory=Counter)


class WorkerPool:
    """The scheduler's view of every worker, replaced per dispatcher by each state snapshot."""

    def __init__(self, partitions: int = 1, partition: int = 0, *, eager: bool = False) -> None:
        self.partitions, self.partition, self.eager = partitions, partition, eager
        self._dispatchers: dict[str, _DispatcherView] = {}
        self._rotation = itertools.count()
        self._lanes: dict[tuple[str, str], list[WorkerView]] = {}
        # worker id, or PRINCIPAL + principal -> (last resort until, strikes)
        self._cooling: dict[str, tuple[float, int]] = {}
        self._principals: dict[str, str] = {}  # worker id -> its principal, as last reported
        # Principals one of whose sessions acknowledged a task. The others are on probation: one
        # task in flight across all their sessions, so thirty sessions that never acknowledge hold
        # one honest task at a time, not thirty times their slots.
        self._proven: set[str] = set()
        self._probation: Counter[str] | None = None  # unproven principal -> tasks in flight (None: to count)
        self._key_leases: Counter[KeyScope] = Counter()  # reported by dispatchers, summed
        self._key_transit: Counter[KeyScope] = Counter()  # published, not yet in a report
        self._served: set[tuple[str, str]] | None = None

    def __iter__(self) -> Iterator[WorkerView]:
        for view in self._dispatchers.values():
            yield from view.workers.values()

    def __len__(self) -> int:
        return sum(len(v.workers) for v in self._dispatchers.values())

    def update(
        self,
        dispatcher_id: str,
        seq: int,
        draining: bool,
        workers: Iterable[WorkerReport],
        now: float,
        key_leases: Iterable[tuple[KeyScope, int]] = (),
        *,
        delta: bool = False,
        gone: Iterable[str] = (),
        epoch: str = "",
    ) -> bool:
        """Apply a snapshot (or a delta: the workers that changed, and the sessions gone); returns True if applied.

        A seq counts only within its epoch (one dispatcher process's run). An older message (by seq)
        is ignored; so is a delta that does not follow the last message applied, until the next full
        snapshot, and a full snapshot whose seq jumps more than MAX_SEQ_JUMP ahead. A full snapshot
        of another epoch replaces the view whatever its seq, so no seq, however large, locks a
        dispatcher out for longer than its next full snapshot. Workers are updated in place, so a
        change of free slots costs nothing beyond the worker itself.
        """
        view = self._dispatchers.get(dispatcher_id)
        if view is not None and epoch != view.epoch:
            if delta:
                return False  # of another instance than the view: wait for its full snapshot
            self.forget(dispatcher_id)
            view = None
        if view is not None and not delta and seq - view.seq > MAX_SEQ_JUMP:
            return False
        if view is not None and seq <= view.seq and seq != 0:
            view.seen_at = now
            return False
        if delta and (view is None or seq != view.seq + 1):
            if view is not None:
                view.seen_at = now  # alive, though this delta cannot be applied
            return False
        if view is None:
            view = self._dispatchers[dispatcher_id] = _DispatcherView(
                seq=seq, epoch=epoch, seen_at=now, draining=draining
            )
        view.seq, view.seen_at, view.draining = seq, now, draining
        self._key_leases.subtract(view.key_leases)
        view.key_leases = Counter(dict(key_leases))
        self._key_leases.update(view.key_leases)
        reshaped = False
        reported = set()
        self._probation = None
        for w in workers:
            reported.add(w.session_id)
            if w.acknowledged and w.principal and w.principal not in self._proven:
                self._prove(w.principal)
            ready = w.ready and not draining
            free, prefetch = self.claim(w, seq) if self.partitions > 1 else (w.free_slots, w.prefetch)
            current = view.workers.get(w.session_id)
            if current is None:
                view.workers[w.session_id] = WorkerView(
                    worker_id=w.worker_id,
                    session_id=w.session_id,
                    dispatcher_id=dispatcher_id,
                    tenant=w.tenant,
                    actions=frozenset(w.actions),
                    labels=dict(w.labels),
                    slots=w.slots,
                    reported_free=free,
                    reported_received=w.received,
                    ready=ready,
                    prefetch=prefetch,
                    principal=w.principal,
                    leases=w.leases,
                    sent=w.received,
                )
                if w.principal:
                    self._principals[w.worker_id] = w.principal
                reshaped = True
                continue
            reshaped |= current.ready != ready or current.tenant != w.tenant or current.actions != frozenset(w.actions)
            current.tenant, current.actions, current.labels = w.tenant, frozenset(w.actions), dict(w.labels)
            current.slots, current.reported_free, current.reported_received = w.slots, free, w.received
            current.ready, current.prefetch, current.principal = ready, prefetch, w.principal
            current.leases = w.leases
            # Never below what the dispatcher consumed: a redelivered or re-published assignment
            # is consumed twice, and a `sent` left behind would read as nothing in transit forever.
            current.sent = max(current.sent, w.received)
            while current.keyed and current.keyed[0][0] <= w.received:  # now among the dispatcher's leases
                self._key_transit[current.keyed.popleft()[1]] -= 1
        removed = set(gone) if delta else view.workers.keys() - reported
        for session_id in removed & view.workers.keys():
            self._drop_transit(view.workers.pop(session_id))
            reshaped = True
        if reshaped:
            self._changed()
        return True

    def claim(self, w: WorkerReport, seq: int) -> tuple[int, int]:
        """This partition's claim on a worker's reported free slots, and how much of it is queue room.

        Exact (the default): every partition gets F // P of the F free slots, and the slots left
        over go round by turn (the report's seq and the session: the same for every partition that
        read the report), so the claims add up to what the report shows. A slot whose turn is an
        idle partition's waits for the worker's next report. Eager: idle slots are claimed rounded
        up, so a partition with work never leaves one for the others, and together they overshoot
        by at most P - 1 (turned away as NO_SLOT). Idle slots and queue room are shared apart, so a
        partition still tells one from the other.
        """
        parts = self.partitions
        room = min(w.prefetch, w.free_slots)
        idle = w.free_slots - room
        mine = (self.partition - seq - zlib.crc32(w.session_id.encode())) % parts
        idle_claim = -(-idle // parts) if self.eager else idle // parts + (mine < idle % parts)
        room_claim = room // parts + ((mine - idle) % parts < room % parts)
        return idle_claim + room_claim, room_claim

    def _changed(self) -> None:
        self._lanes.clear()
        self._served = None

    def _drop_transit(self, worker: WorkerView) -> None:
        for _, scope in worker.keyed:
            self._key_transit[scope] -= 1
        worker.keyed.clear()

    def running(self, scope: KeyScope) -> int:
        """Tasks of a (tenant, action, key) running or on their way to a worker."""
        return max(0, self._key_leases[scope]) + max(0, self._key_transit[scope])

    def serves(self, tenant: str, action: str) -> bool:
        """Whether any worker taking work serves the action (labels aside)."""
        if self._served is None:
            self._served = {(w.tenant, a) for w in self if w.ready for a in w.actions}
        return (tenant, action) in self._served

    def _lane(self, tenant: str, action: str) -> list[WorkerView]:
        """The workers of a tenant that serve an action, indexed once per change of the view."""
        lane = self._lanes.get((tenant, action))
        if lane is None:
            lane = self._lanes[(tenant, action)] = [w for w in self if w.tenant == tenant and action in w.actions]
        return lane

    def forget(self, dispatcher_id: str) -> None:
        view = self._dispatchers.pop(dispatcher_id, None)
        if view is not None:
            self._key_leases.subtract(view.key_leases)
            for worker in view.workers.values():
                self._drop_transit(worker)
        self._probation = None
        self._changed()

    def forget_silent(self, now: float, stale_after: float) -> list[str]:
        """Drop dispatchers not heard from within `stale_after` seconds; returns their ids."""
        gone = [d for d, v in self._dispatchers.items() if now - v.seen_at > stale_after]
        for d in gone:
            self.forget(d)
        return gone

    def alive(self, worker_id: str, tenant: str, action: str) -> bool:
        """Whether a worker of that id takes work for the action (whatever its free slots)."""
        return any(w.worker_id == worker_id and w.ready for w in self._lane(tenant, action))

    def cool_down(self, worker_id: str, now: float, base: float, longest: float = 60.0) -> None:
        """A worker that just failed a dispatch (stalled, lost) gets work only as a last resort for a while.

        The while doubles with each strike, so a worker that keeps stalling keeps losing its share;
        a worker that stayed clear of trouble for `longest` starts again from `base`. Every session
        of the same principal cools with it: many sessions that never acknowledge are one party,
        not thirty chances to fail a task.
        """
        self._cool(worker_id, now, base, longest)
        principal = self._principals.get(worker_id)
        if principal:
            self._cool(PRINCIPAL + principal, now, base, longest)

    def _cool(self, key: str, now: float, base: float, longest: float) -> None:
        until, strikes = self._cooling.get(key, (0.0, 0))
        if now > until + longest:
            strikes = 0
        if now < until and strikes:
            return  # the failures of one episode count once
        self._cooling[key] = (now + min(longest, base * 2**strikes), strikes + 1)
        if len(self._cooling) > 100_000:  # long cooled keys first
            for old in [k for k, (u, _) in self._cooling.items() if u + longest < now]:
                del self._cooling[old]

    def _prove(self, principal: str) -> None:
        if len(self._proven) >= 100_000:  # a bound against principals made up by the thousand
            self._proven = {w.principal for w in self if w.principal in self._proven}
        self._proven.add(principal)

    def on_probation(self, worker: WorkerView) -> bool:
        """Whether no session of the worker's principal has acknowledged a task yet."""
        return bool(worker.principal) and worker.principal not in self._proven

    def _probation_load(self, principal: str) -> int:
        """Tasks in flight to the sessions of an unproven principal (counted again after each report)."""
        if self._probation is None:
            load: Counter[str] = Counter()
            for w in self:
                if w.principal and w.principal not in self._proven:
                    load[w.principal] += w.leases + w.in_transit
            self._probation = load
        return self._probation[principal]

    def _served_by_others(self, workers: Iterable[WorkerView], labels: dict[str, str], now: float) -> bool:
        """Whether a worker other than stalled unproven ones takes the lane's tasks (free or not)."""
        return any(
            w.ready
            and all(w.labels.get(k) == v for k, v in labels.items())
            and not (self.on_probation(w) and self.cooling(w, now))
            for w in workers
        )

    def cooling(self, worker: WorkerView, now: float) -> bool:
        cooling = self._cooling
        if cooling.get(worker.worker_id, (0.0, 0))[0] > now:
            return True
        return bool(worker.principal) and cooling.get(PRINCIPAL + worker.principal, (0.0, 0))[0] > now

    def pick(
        self,
        tenant: str,
        action: str,
        labels: dict[str, str],
        avoid: frozenset[str] = frozenset(),
        now: float = 0.0,
        *,
        preferred: Sequence[Preference] = (),
        sticky: str = "",
    ) -> WorkerView | None:
        """The eligible worker with an idle slot (not just room in its queue at the dispatcher), then
        the one that matches the most preferred labels, then the largest share of free slots; ties go
        round-robin.

        A worker in `avoid` (it failed this task before) or cooling down is used only when no other
        can take it. With `sticky` naming a worker that takes this action, only that worker will do:
        None while it is full.
        """
        best: WorkerView | None = None
        best_score = (False, -1, -1.0)
        fallback: WorkerView | None = None
        workers = self._lane(tenant, action)
        if sticky:
            mine = [w for w in workers if w.worker_id == sticky and w.ready and w.serves(tenant, action, labels)]
            if mine:
                return next((w for w in mine if w.free > 0), None)
        count = len(workers)
        if not count:
            return None
        cooling = self._cooling
        proven = self._proven
        last_resort: WorkerView | None = None
        stalled_on_probation: WorkerView | None = None
        # Start the scan at a rotating offset and keep the first best: equal workers take turns.
        # (The hot loop of the scheduler: the free-slot estimate is inlined.)
        start = next(self._rotation) % count
        for index in range(count):
            w = workers[(start + index) % count]
            if not w.ready:
                continue
            transit = w.sent - w.reported_received
            free = w.reported_free - (transit if transit > 0 else 0)
            if free <= 0:
                continue
            if labels and not all(w.labels.get(k) == v for k, v in labels.items()):
                continue
            if w.principal and w.principal not in proven:
                if self._probation_load(w.principal):
                    continue  # one task at a time until one of its principal's sessions acknowledges
                if cooling and self.cooling(w, now):
                    # It stalled and never acknowledged anything: only if nobody else takes the lane,
                    # and one that did not stall itself first.
                    if stalled_on_probation is None or cooling.get(stalled_on_probation.worker_id, (0.0, 0))[0] > now:
                        stalled_on_probation = w
                    continue
            if (avoid and w.worker_id in avoid) or (cooling and self.cooling(w, now)):
                # A worker cooling only for its principal (a neighbour stalled: without credentials
                # the principal is the host) goes before one that failed itself.
                if (avoid and w.worker_id in avoid) or cooling.get(w.worker_id, (0.0, 0))[0] > now:
                    last_resort = last_resort or w
                else:
                    fallback = fallback or w
                continue
            # An idle slot first: a task queued behind busy ones waits while another worker idles.
            score = (free > w.prefetch, w.preference(preferred) if preferred else 0, free / w.slots)
            if score > best_score:
                best, best_score = w, score
        choice = best or fallback or last_resort
        if choice is None and stalled_on_probation is not None and not self._served_by_others(workers, labels, now):
            return stalled_on_probation
        return choice

    def assigned(self, worker: WorkerView, scope: KeyScope | None = None) -> None:
        worker.sent += 1
        if self._probation is not None and worker.principal and worker.principal not in self._proven:
            self._probation[worker.principal] += 1
        if scope is not None:
            worker.keyed.append((worker.sent, scope))
            self._key_transit[scope] += 1

    def unassigned(self, worker: WorkerView, scope: KeyScope | None = None) -> None:
        """Take back an assignment that was never published, on the worker's current view."""
        self._probation = None
        view = self._dispatchers.get(worker.dispatcher_id)
        current = view.workers.get(worker.session_id) if view else None
        if current is not None:
            current.sent = max(0, current.sent - 1)
            if scope is not None:
                for index in range(len(current.keyed) - 1, -1, -1):
                    if current.keyed[index][1] == scope:
                        del current.keyed[index]
                        self._key_transit[scope] -= 1
                        break
