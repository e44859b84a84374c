"""Worker sessions and the leases they hold: the dispatcher's pure bookkeeping.

A lease is one attempt (task id, attempt) that this dispatcher forwarded to one worker session
and has not yet settled. It counts against the worker's slots from the moment it is taken until a
terminal report or a requeue settles it; settling happens once, and whoever settles first decides.
Leases of tasks with a concurrency key are also counted per (tenant, action, key), for the
scheduler's limits.
"""

from __future__ import annotations

import heapq
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sluicegate.errors import InvalidInput, NoFreeSlot, NotConnected, UnknownSession

LeaseKey = tuple[str, int]
ConcurrencyKey = tuple[str, str, str]  # (tenant, action, concurrency key)


@dataclass(slots=True, eq=False)
class Lease:
    key: LeaseKey
    session: WorkerSession
    payload: Any  # the shell's wire message for this attempt
    token: Any  # the shell's handle to the broker delivery that carries it
    taken_at: float
    receipt_deadline: float
    received: bool = False
    finishing: bool = False  # a terminal report is being published for it
    concurrency: ConcurrencyKey | None = None
    forwarded: bool = True  # written to the worker's stream (else waiting in the session's queue)
    written_at: float = float("inf")  # when the write carrying it went through (inf: not yet)
    settled: bool = False
    order: tuple[int, int] = (0, 0)  # (-priority, arrival): its place in the session's queue
    span: Any = None  # the shell's dispatch span
    run_deadline: float = float("inf")  # by when the worker must have finished it (timeout + grace)
    cancelling: str = ""  # why the worker was told to stop it ("" while it was not)
    cancel_deadline: float = float("inf")  # after this the dispatcher ends it without the worker


@dataclass(slots=True, eq=False)
class WorkerSession:
    worker_id: str
    session_id: str
    tenant: str
    actions: frozenset[str]
    labels: dict[str, str]
    slots: int
    last_seen: float
    window: int = 0  # most assignments that may await the worker's receipt at once (0: slots)
    unacknowledged: int = 0  # leases whose receipt the worker has not acknowledged yet
    acknowledged: int = 0  # receipts it has given (none yet: its principal may be on probation)
    leases: dict[LeaseKey, Lease] = field(default_factory=dict)
    stream: Any = None  # the shell's open stream (with its send lock), when streaming
    streams_opened: int = 0
    stream_lost_at: float | None = None
    received: int = 0  # assignments consumed for this session, reported to the scheduler
    # Of those, per scheduler partition (index = partition); empty until a partition other than 0 assigned.
    received_by_partition: list[int] = field(default_factory=list)
    closed: bool = False
    action_options: dict[str, Any] = field(default_factory=dict)  # the shell's per-action defaults
    finishing: int = 0  # leases whose handler finished, waiting for their result to be confirmed
    prefetch: int = 0  # leases it may hold beyond its free slots, queued here until a slot frees
    queue: list[tuple[tuple[int, int], Lease]] = field(default_factory=list)  # heap: priority, then arrival
    queued: int = 0
    leaving: bool = False  # the worker said it is shutting down: once its stream ends, the session ends
    principal: str = ""  # who stands behind it (the authenticated identity, else the peer's host)
    # Probes of its reading, for a worker that said it answers them: the last sent, when (None:
    # never), and since when it is unanswered (None: answered).
    answers_pings: bool = False
    ping: int = 0
    pinged_at: float | None = None
    ping_unanswered_since: float | None = None

    @property
    def streaming(self) -> bool:
        return self.stream is not None

    @property
    def worker_room(self) -> int:
        """Assignments that may be written to the worker now: free slots, within the receipt window."""
        window = self.window or self.slots
        # A finished handler frees its slot at once; its lease waits only for the broker's confirm.
        running = len(self.leases) - self.finishing - self.queued
        return max(0, min(self.slots - running, window - self.unacknowledged))

    @property
    def free_slots(self) -> int:
        """Assignments it can take now, as the scheduler is told: room on the worker, and in its queue."""
        return max(0, self.worker_room + self.prefetch - self.queued)

    @property
    def ready(self) -> bool:
        return self.streaming and not self.closed


def not_reading(session: WorkerSession, now: float, timeout: float) -> bool:
    """A session that answers probes of its reading has left one unanswered for `timeout`.

    (Probes go only to workers that said they answer them; a lease that settles does not answer one.)

    Its heartbeats may still come (they are written, not read): without this, the tasks it
    acknowledged would be held for ever, their results unsent behind answers it never reads.
    """
    since = session.ping_unanswered_since
    return session.answers_pings and since is not None and now - since > timeout


class Sessions:
    """Every worker session on this dispatcher and every lease they hold."""

    def __init__(self, *, remember_settled: int = 100_000, receipt_window: int = 0, prefetch: int = 0) -> None:
        self._receipt_window = receipt_window
        self._prefetch = prefetch
        self._arrivals = 0
        self.on_room: Callable[[WorkerSession], None] = lambda _session: None  # a queued lease may go now
        self._by_worker: dict[str, WorkerSession] = {}
        self._by_session: dict[str, WorkerSession] = {}
        self._leases: dict[LeaseKey, Lease] = {}
        self._by_concurrency: Counter[ConcurrencyKey] = Counter()
        self._settled: OrderedDict[LeaseKey, bool] = OrderedDict()  # -> settled by a result (not a requeue)
        self._remember_settled = remember_settled
        self._receipts: deque[Lease] = deque()  # leases in the order their receipt deadlines come
        self.version = 0  # bumps on every change the scheduler should hear about
        self._runs: list[tuple[float, int, Lease]] = []  # (run deadline, arrival, lease): a heap
        self._stopping: set[Lease] = set()  # leases whose worker was told to stop them
        self.cancelled: OrderedDict[str, str] = OrderedDict()  # task id -> why (never to start)
        self.dirty: set[str] = set()  # sessions changed since the scheduler last heard
        self.gone: set[str] = set()  # sessions closed since the scheduler last heard
        self.on_change: Callable[[], None] = lambda: None  # the shell's wake-up for whoever publishes state

    def __len__(self) -> int:
        return len(self._by_session)

    def __iter__(self) -> Iterator[WorkerSession]:
        return iter(list(self._by_session.values()))

    @property
    def leases(self) -> int:
        return len(self._leases)

    def changed(self, session: WorkerSession | None = None) -> None:
        self.version += 1
        if session is not None:
            self.dirty.add(session.session_id)
        self.on_change()

    def take_changes(self) -> tuple[list[WorkerSession], list[str]]:
        """The sessions changed and the sessions gone since the last call (for a state delta)."""
        changed = [s for sid in self.dirty if (s := self._by_session.get(sid)) is not None]
        gone = sorted(self.gone)
        self.dirty, self.gone = set(), set()
        return changed, gone

    def register(
        self,
        *,
        worker_id: str,
        tenant: str,
        actions: frozenset[str],
        labels: dict[str, str],
        slots: int,
        now: float,
        action_options: dict[str, Any] | None = None,
        principal: str = "",
        answers_pings: bool = False,
    ) -> tuple[WorkerSession, WorkerSession | None]:
        """Open a new session; returns it and the session it supersedes, if the worker had one."""
        if not actions:
            raise InvalidInput("a worker must serve at least one action")
        if slots < 1:
            raise InvalidInput("slots must be at least 1")
        worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        previous = self._by_worker.get(worker_id)
        session = WorkerSession(
            worker_id=worker_id,
            session_id=uuid.uuid4().hex,
            tenant=tenant,
            actions=actions,
            labels=labels,
            slots=slots,
            window=min(slots, self._receipt_window) if self._receipt_window else slots,
            last_seen=now,
            stream_lost_at=now,  # no stream yet: it must show up within the reconnect grace
            action_options=dict(action_options or {}),
            prefetch=min(slots, self._prefetch),
            principal=principal or worker_id,
            answers_pings=answers_pings,
        )
        self._by_worker[worker_id] = session
        self._by_session[session.session_id] = session
        if previous is not None:
            previous.closed = True
            del self._by_session[previous.session_id]
            self.gone.add(previous.session_id)
        self.changed(session)
        return session, previous

    def session(self, worker_id: str, session_id: str) -> WorkerSession:
        session = self._by_session.get(session_id)
        if session is None or session.worker_id != worker_id:
            raise UnknownSession("unknown worker session; register again")
        return session

    def count_received(self, worker_id: str, session_id: str, partition: int = 0) -> None:
        """Count an assignment consumed for a session, whatever becomes of it (the scheduler's ledger).

        Each scheduler partition counts what it sent against what it placed: counts per partition
        start once a partition other than 0 is seen (partition 0's is the total until then).
        """
        session = self._by_session.get(session_id)
        if session is not None and session.worker_id == worker_id:
            session.received += 1
            counts = session.received_by_partition
            if partition or counts:
                if not counts:
                    counts.append(session.received - 1)  # everything before came from partition 0
                counts.extend([0] * (partition + 1 - len(counts)))
                counts[partition] += 1
            self.changed(session)

    def target(self, worker_id: str, session_id: str) -> WorkerSession:
        """The session an assignment is for, if it can take one now."""
        session = self._by_session.get(session_id)
        if session is None or session.worker_id != worker_id or not session.ready:
            raise NotConnected(f"worker {worker_id} is not streaming from this dispatcher")
        if session.free_slots <= 0:
            raise NoFreeSlot(f"worker {worker_id} has no free slot")
        return session

    def close(self, session: WorkerSession) -> list[Lease]:
        """Remove a session; returns its leases, which the caller must requeue."""
        session.closed = True
        if self._by_session.get(session.session_id) is session:
            del self._by_session[session.session_id]
        if self._by_worker.get(session.worker_id) is session:
            del self._by_worker[session.worker_id]
        leases = list(session.leases.values())
        for lease in leases:
            self.settle(lease.key)
        self.gone.add(session.session_id)
        self.dirty.discard(session.session_id)
        self.changed()
        return leases

    # Streams.

    def attach(self, session: WorkerSession, stream: Any, now: float) -> Any:
        """Make `stream` the session's stream; returns the stream it replaces, if any."""
        previous = session.stream
        session.stream = stream
        session.streams_opened += 1
        session.stream_lost_at = None
        session.last_seen = now
        self.changed(session)
        return previous

    def detach(self, session: WorkerSession, stream: Any, now: float) -> bool:
        """Forget `stream` if it is still the session's; True if it was."""
        if session.stream is not stream:
            return False
        session.stream = None
        session.stream_lost_at = now
        self.changed(session)
        return True

    def seen(self, session: WorkerSession, now: float) -> None:
        session.last_seen = now
        if session.stream_lost_at is not None and not session.streaming:
            # Alive without a stream: the reconnect grace starts again from this sign of life.
            session.stream_lost_at = now

    def lost(self, now: float, *, heartbeat_timeout: float, reconnect_grace: float) -> list[WorkerSession]:
        """Sessions to give up on: silent too long, whose stream dropped with no sign of life since, or
        that no longer read their stream.

        A session that never streamed holds no lease, so only silence loses it: under load its first
        stream may come later than the reconnect grace after Register.
        """
        return [
            s
            for s in self._by_session.values()
            if now - s.last_seen > heartbeat_timeout
            or (s.leaving and not s.streaming)
            or (s.streams_opened and s.stream_lost_at is not None and now - s.stream_lost_at > reconnect_grace)
            or not_reading(s, now, heartbeat_timeout)
        ]

    def to_ping(self, now: float, every: float) -> list[WorkerSession]:
        """Sessions due a probe of their reading: streaming, holding tasks, `every` seconds after the last.

        An idle stream is not probed (it holds nothing that could wait on it), so idle fleets cost nothing.
        """
        due = []
        for s in self._by_session.values():
            if (
                s.answers_pings
                and s.leases
                and s.streaming
                and s.ping_unanswered_since is None
                and (s.pinged_at is None or now - s.pinged_at >= every)
            ):
                s.ping += 1
                s.pinged_at = s.ping_unanswered_since = now
                due.append(s)
        return due

    @staticmethod
    def ponged(session: WorkerSession, pong: int) -> None:
        """The worker read the probe `pong` (and every one before it)."""
        if pong and pong >= session.ping:
            session.ping_unanswered_since = None

    # Leases.

    def take(
        self,
        session: WorkerSession,
        key: LeaseKey,
        payload: Any,
        token: Any,
        now: float,
        ack_timeout: float,
        *,
        concurrency: ConcurrencyKey | None = None,
        priority: int = 0,
        queue: bool = False,
    ) -> Lease:
        """Take the lease of one attempt, forwarded at once or (`queue`) waiting in the session's queue.

        `concurrency` is its task's (tenant, action, key), if it has a key.
        """
        self._arrivals += 1
        lease = Lease(
            key=key,
            session=session,
            payload=payload,
            token=token,
            taken_at=now,
            receipt_deadline=float("inf"),
            concurrency=concurrency,
            forwarded=False,
            order=(-priority, self._arrivals),
        )
        session.leases[key] = lease
        self._leases[key] = lease
        if concurrency is not None:
            self._by_concurrency[concurrency] += 1
        if queue:
            heapq.heappush(session.queue, (lease.order, lease))
            session.queued += 1
        else:
            self._forwarded(lease, now, ack_timeout)
        self.changed(session)
        return lease

    def _forwarded(self, lease: Lease, now: float, ack_timeout: float) -> None:
        lease.forwarded = True
        lease.receipt_deadline = now + ack_timeout
        lease.session.unacknowledged += 1
        self._receipts.append(lease)

    def forward_queued(self, session: WorkerSession, now: float, ack_timeout: float) -> list[Lease]:
        """Queued leases that may go to the worker now, highest priority first, then oldest."""
        out: list[Lease] = []
        while session.queue and session.worker_room > 0:
            _, lease = heapq.heappop(session.queue)
            if lease.settled:
                continue
            session.queued -= 1
            self._forwarded(lease, now, ack_timeout)
            out.append(lease)
        if out:
            self.changed(session)
        return out

    @staticmethod
    def queued_leases(session: WorkerSession) -> list[Lease]:
        """The leases waiting in the session's queue, in its order (left in it: a settled one is skipped there)."""
        return [lease for _, lease in sorted(session.queue, key=lambda entry: entry[0]) if not lease.settled]

    def expired_queued(self, expired: Callable[[Lease], bool]) -> list[Lease]:
        """Queued leases past their start deadline, taken out of their queues (the caller settles them)."""
        out: list[Lease] = []
        for session in self._by_session.values():
            if not session.queued:
                continue
            late = [lease for _, lease in session.queue if not lease.settled and expired(lease)]
            if late:
                session.queue = [entry for entry in session.queue if entry[1] not in late]
                heapq.heapify(session.queue)
                out.extend(late)
        return out

    def holder(self, key: LeaseKey, session: WorkerSession) -> Lease | None:
        """The lease for `key` if `session` holds it."""
        lease = self._leases.get(key)
        if lease is None or lease.session is not session:
            return None
        return lease

    def holder_of(self, key: LeaseKey) -> Lease | None:
        return self._leases.get(key)

    def was_settled(self, key: LeaseKey) -> bool:
        return key in self._settled

    def mark_settled(self, key: LeaseKey) -> None:
        """An attempt sent back without ever holding a lease here: a later copy of it is settled at once."""
        self._settled[key] = False
        if len(self._settled) > self._remember_settled:
            self._settled.popitem(last=False)

    def finished_before(self, key: LeaseKey) -> bool:
        """Whether the attempt was settled by its result (a terminal report), not sent back."""
        return self._settled.get(key, False)

    def finishing(self, lease: Lease) -> None:
        """The worker reported the attempt finished: its slot is free while its result is published."""
        if not lease.finishing:
            lease.finishing = True
            lease.session.finishing += 1
            self.changed(lease.session)
            if lease.session.queued:
                self.on_room(lease.session)

    def settle(self, key: LeaseKey, *, finished: bool = False) -> Lease | None:
        """Remove and return the lease, or None if someone settled it already."""
        lease = self._leases.pop(key, None)
        if lease is None:
            return None
        session = lease.session
        session.leases.pop(key, None)
        lease.settled = True
        if lease.finishing:
            session.finishing -= 1
        if not lease.forwarded:
            session.queued -= 1  # its queue entry is skipped when it comes up
        elif not lease.received:
            session.unacknowledged -= 1
        if lease.concurrency is not None:
            self._by_concurrency[lease.concurrency] -= 1
            if self._by_concurrency[lease.concurrency] <= 0:
                del self._by_concurrency[lease.concurrency]
        self._settled[key] = finished
        if len(self._settled) > self._remember_settled:
            self._settled.popitem(last=False)
        self.changed(session)
        if session.queued and lease.forwarded and not lease.finishing:
            self.on_room(session)
        return lease

    def key_leases(self) -> dict[ConcurrencyKey, int]:
        """Leases held now per (tenant, action, concurrency key); keys with none are left out."""
        return dict(self._by_concurrency)

    def acknowledge(self, lease: Lease) -> bool:
        """Record the worker's receipt of a lease; True the first time."""
        if lease.received or not lease.forwarded:
            return False
        lease.received = True
        lease.session.unacknowledged -= 1
        lease.session.acknowledged += 1
        self.changed(lease.session)
        if lease.session.queued:
            self.on_room(lease.session)  # the receipt window has room again
        return True

    @staticmethod
    def keeps_up(session: WorkerSession, now: float, within: float) -> bool:
        """Whether the worker reads what it is sent: nothing written to it `within` ago or earlier awaits its receipt.

        A send that waits long on the stream's lock behind such a worker waits on the link (or on
        this process), not on the worker; one that is not read leaves its receipts owed.
        """
        cutoff = now - within
        return not any(
            lease.written_at <= cutoff and not lease.received and not lease.settled for lease in session.leases.values()
        )

    def unacknowledged(self, session: WorkerSession) -> list[Lease]:
        """Leases the worker has not acknowledged: sent without a receipt yet, or still queued here."""
        return [lease for lease in session.leases.values() if not lease.received]

    # Run deadlines and cancellations.

    def started(self, lease: Lease, deadline: float) -> None:
        """The worker runs it from now: it must finish by `deadline` (or extend it)."""
        lease.run_deadline = deadline
        if deadline != float("inf"):
            heapq.heappush(self._runs, (deadline, lease.order[1], lease))

    def extend(self, lease: Lease, seconds: float, now: float) -> None:
        """The handler said it needs longer: its deadline moves, never before what it was."""
        if lease.run_deadline != float("inf") and now + seconds > lease.run_deadline:
            self.started(lease, now + seconds)

    def overdue_runs(self, now: float) -> list[Lease]:
        """Held leases whose run deadline passed, each once."""
        overdue = []
        while self._runs and self._runs[0][0] <= now:
            deadline, _, lease = heapq.heappop(self._runs)
            if not lease.settled and not lease.finishing and lease.run_deadline == deadline:
                overdue.append(lease)
        return overdue

    def cancel(self, task_id: str, reason: str) -> list[Lease]:
        """Remember a cancellation; returns the leases of that task held here."""
        self.cancelled[task_id] = reason or "cancelled"
        while len(self.cancelled) > 1_000_000:
            self.cancelled.popitem(last=False)
        return [lease for key, lease in self._leases.items() if key[0] == task_id]

    def stopping(self, lease: Lease, reason: str, deadline: float) -> None:
        """The worker was told to stop the attempt; past `deadline` it is ended without the worker."""
        lease.cancelling, lease.cancel_deadline = reason or "cancelled", deadline
        self._stopping.add(lease)

    def overdue_cancels(self, now: float) -> list[Lease]:
        done = [lease for lease in self._stopping if lease.settled or lease.finishing]
        self._stopping.difference_update(done)
        return [lease for lease in self._stopping if now > lease.cancel_deadline]

    def overdue_receipts(self, now: float) -> list[Lease]:
        """Held leases whose receipt deadline passed unacknowledged (deadlines come in the order taken)."""
        overdue = []
        receipts = self._receipts
        while receipts and (receipts[0].received or self._leases.get(receipts[0].key) is not receipts[0]):
            receipts.popleft()  # acknowledged or settled: no deadline to watch
        for lease in receipts:  # not changed while iterated
            if now <= lease.receipt_deadline:
                break
            if not lease.received and self._leases.get(lease.key) is lease:
                overdue.append(lease)
        return overdue
