"""Lanes: where tasks that cannot be placed at once wait, one durable queue each, and what is known of them (pure).

A lane holds the tasks of one (tenant, action, priority, fairness key, concurrency key), oldest
first. Keeping them apart is what stops one backlog from delaying anyone else: a lane whose action
no worker serves, or whose key is at its limit, is simply not read. Lanes are bounded in number:
past `max_lanes`, keyed tasks share one overflow lane per (tenant, action, priority), in which
the scheduler looks past a blocked head for a task that can go.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.items import Origin, Pending

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclass(frozen=True, slots=True)
class LaneKey:
    tenant: str
    action: str
    priority: int
    fairness_key: str = ""
    concurrency_key: str = ""
    overflow: bool = False

    @property
    def keyed(self) -> bool:
        return bool(self.fairness_key or self.concurrency_key)

    def queue_name(self, prefix: str) -> str:
        """A readable name that stays under AMQP's 255 bytes, made unique by a digest of the whole key."""
        whole = "\x1f".join(
            (self.tenant, self.action, str(self.priority), self.fairness_key, self.concurrency_key, str(self.overflow))
        )
        digest = hashlib.blake2b(whole.encode(), digest_size=6).hexdigest()
        action = _UNSAFE.sub("_", self.action)[:64]
        kind = "overflow" if self.overflow else "keyed" if self.keyed else "lane"
        return f"{prefix}.lane.{self.tenant[:32]}.{action}.p{self.priority}.{kind}.{digest}"

    def record(self, prefix: str) -> messages_pb2.LaneRecord:
        return messages_pb2.LaneRecord(
            queue=self.queue_name(prefix),
            tenant=self.tenant,
            action=self.action,
            priority=self.priority,
            fairness_key=self.fairness_key,
            concurrency_key=self.concurrency_key,
            overflow=self.overflow,
        )

    @staticmethod
    def of_record(record: messages_pb2.LaneRecord) -> LaneKey:
        return LaneKey(
            record.tenant,
            record.action,
            record.priority,
            record.fairness_key,
            record.concurrency_key,
            record.overflow,
        )


def exact_key(task: messages_pb2.Task) -> LaneKey:
    return LaneKey(task.tenant, task.action, task.priority, task.fairness_key, task.concurrency_key)


@dataclass(slots=True, eq=False)
class Lane:
    key: LaneKey
    name: str
    held: deque[Pending] = field(default_factory=deque)
    held_bytes: int = 0
    parked: int | None = 0  # tasks confirmed parked and not read back; None: unknown (found after a restart)
    parking: int = 0  # tasks in park publishes not confirmed yet
    oldest: deque[list[int]] = field(default_factory=deque)  # [tasks, oldest submit ms] runs, in park order
    ready: bool = False  # declared and recorded: parks may go to it
    consuming: bool = False
    idle_since: float | None = None
    deficit: int = 0
    probed_at: float = 0.0  # when the broker was last asked how much it holds

    @property
    def backlogged(self) -> bool:
        """Tasks of it wait in the broker (or are on their way there): new ones must queue behind them."""
        return self.parking > 0 or self.parked is None or self.parked > 0

    @property
    def empty(self) -> bool:
        return not self.held and not self.backlogged

    @property
    def depth(self) -> int:
        return len(self.held) + max(0, self.parking + (self.parked or 0))

    def hold(self, item: Pending, *, front: bool = False) -> None:
        if front:
            self.held.appendleft(item)
        else:
            self.held.append(item)
        self.held_bytes += item.size

    def release(self, item: Pending) -> None:
        self.held.remove(item)
        self.held_bytes -= item.size

    def oldest_ms(self) -> int | None:
        times = [i.task.submitted_at_ms for i in self.held if i.task.submitted_at_ms]
        if self.oldest:
            times.append(self.oldest[0][1])
        return min(times) if times else None

    # The broker side, as publishes and consumed messages tell it. A parked message can be read
    # back before its publish is confirmed, so `parked` may dip below zero while `parking` is not.

    def park_started(self, item: Pending) -> None:
        self.parking += 1
        stamp = item.task.submitted_at_ms
        if self.oldest and len(self.oldest) >= OLDEST_RUNS:
            run = self.oldest[-1]  # coarser, never unbounded: the run keeps its oldest stamp
            run[0] += 1
            run[1] = min(run[1], stamp) if run[1] and stamp else run[1] or stamp
        else:
            self.oldest.append([1, stamp])

    def park_confirmed(self, count: int) -> None:
        self.parking -= count
        if self.parked is not None:
            self.parked += count

    def taken(self, count: int) -> None:
        """A message of `count` tasks was read from its queue."""
        if self.parked is not None:
            self.parked -= count
        left = count
        while left and self.oldest:
            run = self.oldest[0]
            used = min(left, run[0])
            run[0] -= used
            left -= used
            if run[0] == 0:
                self.oldest.popleft()

    def drained(self) -> None:
        """The broker said its queue is empty and nothing is being parked: counts are known again."""
        if self.parking == 0:
            self.parked = 0
            self.oldest.clear()


OLDEST_RUNS = 1000


class LaneBook:
    """Every lane known this session, and the choice of lane for a task."""

    def __init__(self, prefix: str, max_lanes: int = 1000) -> None:
        self.prefix = prefix
        self.max_lanes = max_lanes
        self._lanes: dict[LaneKey, Lane] = {}
        self._by_name: dict[str, Lane] = {}
        self._by_work: dict[tuple[str, str], list[Lane]] = {}  # (tenant, action) -> its lanes

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._lanes.values()))

    def __len__(self) -> int:
        return len(self._lanes)

    def named(self, name: str) -> Lane | None:
        return self._by_name.get(name)

    def of_work(self, tenant: str, action: str) -> list[Lane]:
        return self._by_work.get((tenant, action), [])

    def works(self) -> list[tuple[str, str]]:
        return list(self._by_work)

    def lane_for(self, task: messages_pb2.Task) -> Lane:
        """The lane a task waits in: its own, or past the limit on lanes, the shared overflow lane."""
        key = exact_key(task)
        lane = self._lanes.get(key)
        if lane is not None:
            return lane
        if key.keyed and len(self._lanes) >= self.max_lanes:
            key = LaneKey(task.tenant, task.action, task.priority, overflow=True)
            lane = self._lanes.get(key)
            if lane is not None:
                return lane
        return self.add(key)

    def add(self, key: LaneKey, *, found: bool = False) -> Lane:
        """Know a lane; `found` means it already exists in the broker with unknown content."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = Lane(key=key, name=key.queue_name(self.prefix))
            self._lanes[key] = lane
            self._by_name[lane.name] = lane
            self._by_work.setdefault((key.tenant, key.action), []).append(lane)
        if found:
            lane.parked, lane.ready = None, True
        return lane

    def remove(self, lane: Lane) -> None:
        self._lanes.pop(lane.key, None)
        self._by_name.pop(lane.name, None)
        work = self._by_work.get((lane.key.tenant, lane.key.action))
        if work is not None:
            work.remove(lane)
            if not work:
                del self._by_work[(lane.key.tenant, lane.key.action)]

    def held(self) -> Iterator[Pending]:
        for lane in self._lanes.values():
            yield from lane.held

    @property
    def held_bytes(self) -> int:
        return sum(lane.held_bytes for lane in self._lanes.values())

    def clear_held(self) -> list[Pending]:
        """A broker session ended: every held delivery comes again. Returns what was held."""
        dropped: list[Pending] = []
        for lane in self._lanes.values():
            dropped.extend(lane.held)
            lane.held.clear()
            lane.held_bytes = 0
            lane.consuming = False
            lane.ready = False
            lane.parking = 0
            lane.parked = None  # read again to know
            lane.oldest.clear()
        return dropped


class TenantCounts:
    """Tasks waiting per tenant, against a limit: counted from the lanes at most every `every` seconds,
    and between two counts by what was admitted since (a lane read back does not lower it until then).
    """

    def __init__(self, limit: int, every: float = 0.5) -> None:
        self.limit, self.every = limit, every
        self._counts: Counter[str] = Counter()
        self._at: float | None = None

    def admit(self, tenant: str, book: LaneBook, now: float) -> bool:
        """True (and counted) if one more task of `tenant` may wait."""
        if not self.limit:
            return True
        if self._at is None or now - self._at >= self.every:
            self._counts = Counter()
            for lane in book:
                self._counts[lane.key.tenant] += lane.depth
            self._at = now
        if self._counts[tenant] >= self.limit:
            return False
        self._counts[tenant] += 1
        return True


def arrival(origin: Origin) -> bool:
    """Items that must not wait in memory: placed in the round they arrive in, else parked."""
    return origin in (Origin.INTAKE, Origin.DUE, Origin.TIMER)
