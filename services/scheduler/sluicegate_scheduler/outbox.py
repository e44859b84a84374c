"""What the scheduler has decided and not yet had confirmed by the broker, per destination (pure).

Every decision that moves a task (assign it, park it in a lane, put it on the delay ladder, bury
it) is an entry here until the broker confirms the publish that carries it; only then does the
item count as done and may its delivery be acked. One publish is in flight per destination, and
what piles up meanwhile goes out together in the next one (group commit, no timer): a lone task
goes at once, under load batches grow by themselves. Entries of one destination keep their order,
which is what keeps a lane first in, first out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sluicegate_scheduler.items import Pending


class Kind(StrEnum):
    ASSIGN = "assign"  # to a dispatcher's inbox; destination = dispatcher id
    PARK = "park"  # to a lane; destination = lane queue
    DELAY = "delay"  # onto a rung of the delay ladder; destination = rung in ms
    DEAD = "dead"  # to the dead queue, for operators
    RESULT = "result"  # a terminal result to the submitting client; destination = client id
    RECORD = "record"  # a lane record to the registry


@dataclass(slots=True, eq=False)
class Entry:
    kind: Kind
    destination: str
    body: Any  # the protobuf message this entry contributes to the batch
    item: Pending | None = None  # the item whose fate this publish decides (None: best effort)
    size: int = 0
    extra: Any = None  # what the decision needs to undo itself (worker, key scope, span)


@dataclass(slots=True)
class _Queue:
    entries: deque[Entry] = field(default_factory=deque)
    in_flight: list[Entry] = field(default_factory=list)

    @property
    def sending(self) -> bool:
        return bool(self.in_flight)


Destination = tuple[Kind, str]


class Outbox:
    def __init__(self, *, max_items: int = 64, max_bytes: int = 256 * 1024) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queues: dict[Destination, _Queue] = {}

    def __len__(self) -> int:
        return sum(len(q.entries) for q in self._queues.values())

    def add(self, entry: Entry) -> None:
        self._queues.setdefault((entry.kind, entry.destination), _Queue()).entries.append(entry)

    def pending(self, kind: Kind, destination: str) -> int:
        queue = self._queues.get((kind, destination))
        return len(queue.entries) if queue else 0

    def ready(self, can_send: Callable[[Kind, str], bool] = lambda _k, _d: True) -> list[Destination]:
        """Destinations with entries waiting and no publish in flight."""
        return [d for d, q in self._queues.items() if q.entries and not q.sending and can_send(*d)]

    def take(self, destination: Destination) -> list[Entry]:
        """The oldest entries that fit one message (one at least), marked as in flight."""
        queue = self._queues[destination]
        batch: list[Entry] = []
        size = 0
        # Anything but assignments is cut by bytes: at a few hundred items a message, a 10,000-task burst
        # waited for twenty confirms in a row before the intake behind it (other keys' tasks) was read.
        limit = self.max_items if destination[0] == Kind.ASSIGN else max(self.max_items, 5000)
        while queue.entries and len(batch) < limit:
            entry = queue.entries[0]
            if batch and size + entry.size > self.max_bytes:
                break
            batch.append(queue.entries.popleft())
            size += entry.size
        queue.in_flight = batch
        return batch

    def sent(self, destination: Destination) -> None:
        """The publish of a batch ended (confirmed or not): the next may go."""
        queue = self._queues.get(destination)
        if queue is None:
            return
        queue.in_flight = []
        if not queue.entries:
            del self._queues[destination]

    def put_back(self, destination: Destination, batch: list[Entry]) -> None:
        """A batch that must go again goes first, in its order."""
        queue = self._queues.setdefault(destination, _Queue())
        queue.entries.extendleft(reversed(batch))

    def drop(self, destination: Destination) -> list[Entry]:
        """Take every entry of a destination out (it went away); returns them."""
        queue = self._queues.pop(destination, None)
        return list(queue.entries) if queue else []

    def clear(self) -> list[tuple[Entry, bool]]:
        """A broker session ended: nothing in here will be confirmed. Returns every entry, with whether
        it was in flight (published, its confirm lost: it may have arrived) or never sent."""
        entries = [(e, flying) for q in self._queues.values() for e, flying in _both(q)]
        self._queues.clear()
        return entries


def _both(queue: _Queue) -> list[tuple[Entry, bool]]:
    return [(e, True) for e in queue.in_flight] + [(e, False) for e in queue.entries]
