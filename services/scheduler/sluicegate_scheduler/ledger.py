"""Which tasks and attempts the scheduler has seen, where each stands, and what a second copy means (pure).

An item is known by (task id, attempt it will run as). A copy can arrive again: a client that
retried a publish whose confirm was lost, a delivery redelivered after a lost connection, a requeue
published twice. Whether a copy is the item's legitimate continuation or a duplicate depends on
where the item stands and where the copy comes from: a task parked in a lane comes back from that
lane, so the lane's copy continues it, while another copy from the intake is a duplicate.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from enum import Enum

from sluicegate_scheduler.items import Origin

Key = tuple[str, int]


class Standing(Enum):
    HELD = "held"  # in memory, its delivery not settled yet
    PARKED = "parked"  # in a lane or on the delay ladder: its continuation comes from there
    PLACED = "placed"  # published to a dispatcher and confirmed
    SENT = "sent"  # published, its confirm lost: it may be at its dispatcher, or in its lane
    BURIED = "buried"  # ended without running here (dead, rejected, expired, cancelled)


class Verdict(Enum):
    NEW = "new"  # take it
    DUPLICATE = "duplicate"  # settle the copy, do nothing else
    DROP = "drop"  # it ended already (buried): settle the copy


CONTINUATIONS = frozenset({Origin.LANE, Origin.DUE, Origin.TIMER})


class Ledger:
    """Bounded memory of items by key; the oldest entries are forgotten first."""

    def __init__(self, remember: int = 200_000, track_deadlines: int = 200_000) -> None:
        self._remember = remember
        self._track = track_deadlines
        self._standing: OrderedDict[Key, Standing] = OrderedDict()
        self._homes: OrderedDict[Key, str] = OrderedDict()  # SENT items: the worker it was sent to
        self._deadlines: list[tuple[int, Key]] = []  # (deadline ms, key) of items that wait
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._standing)

    def standing(self, key: Key) -> Standing | None:
        return self._standing.get(key)

    def arrive(self, key: Key, origin: Origin) -> Verdict:
        """Decide what a copy arriving from `origin` means; a NEW one is HELD from now on."""
        known = self._standing.get(key)
        if known is Standing.BURIED:
            return Verdict.DROP
        legit = known is None or known is Standing.SENT or (known is Standing.PARKED and origin in CONTINUATIONS)
        if not legit:
            self.duplicates += 1
            return Verdict.DUPLICATE
        self._set(key, Standing.HELD)
        return Verdict.NEW

    def parked(self, key: Key) -> None:
        """Set as the park is published, not when it is confirmed: the lane may give it back first."""
        self._set(key, Standing.PARKED)

    def forget(self, key: Key) -> None:
        """An item whose park was never confirmed: its delivery comes again and decides afresh."""
        self._standing.pop(key, None)

    def placed(self, key: Key) -> None:
        self._set(key, Standing.PLACED)
        self._homes.pop(key, None)

    def sent(self, key: Key, worker_id: str) -> None:
        """Published when a session ended, unconfirmed: its delivery comes again as the same attempt,
        and goes to the same worker, whose dispatcher recognises a copy of what it already has."""
        self._set(key, Standing.SENT)
        if worker_id:
            self._homes[key] = worker_id
            self._homes.move_to_end(key)
            while len(self._homes) > self._remember:
                self._homes.popitem(last=False)

    def home(self, key: Key) -> str:
        """The worker an unconfirmed publish of this attempt went to, until it is placed or ends ("" if none).

        Kept while the copy is parked and read back from its lane, too."""
        return self._homes.get(key, "")

    def buried(self, key: Key) -> None:
        self._set(key, Standing.BURIED)
        self._homes.pop(key, None)

    def released(self, key: Key) -> None:
        """A held item was let go unsettled (its delivery will come again): forget it."""
        if self._standing.get(key) is Standing.HELD:
            del self._standing[key]

    def forget_held(self) -> None:
        """A broker session ended: every held delivery comes again, so held items are unknown now."""
        for key in [k for k, s in self._standing.items() if s is Standing.HELD]:
            del self._standing[key]

    def _set(self, key: Key, standing: Standing) -> None:
        self._standing[key] = standing
        self._standing.move_to_end(key)
        while len(self._standing) > self._remember:
            self._standing.popitem(last=False)

    # Schedule-to-start deadlines of items that wait.

    def watch(self, key: Key, deadline_ms: int) -> None:
        if deadline_ms and len(self._deadlines) < self._track:
            heapq.heappush(self._deadlines, (deadline_ms, key))

    def next_deadline(self) -> int | None:
        return self._deadlines[0][0] if self._deadlines else None

    def overdue(self, now_ms: int) -> list[tuple[Key, Standing]]:
        """Keys whose deadline passed and that still wait (held or parked), with where they stand."""
        due: list[tuple[Key, Standing]] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, key = heapq.heappop(self._deadlines)
            standing = self._standing.get(key)
            if standing in (Standing.HELD, Standing.PARKED):
                due.append((key, standing))
        return due
