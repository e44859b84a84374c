"""Counters the scheduler keeps about what it did; metrics, tests and the demo read them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class SchedulerStats:
    received: int = 0
    assigned: int = 0
    parked: int = 0
    delayed: int = 0
    requeued: Counter[str] = field(default_factory=Counter)
    dead: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    duplicate_requeues: int = 0
    duplicate_tasks: int = 0
    reused_ids: int = 0  # submissions refused: their id belongs to another task
    invalid_states: int = 0  # worker-state messages dropped: no dispatcher would send them
    invalid_cancels: int = 0  # cancellations dropped: they name no task a client could submit
    unroutable_assignments: int = 0
    returned_strays: int = 0  # requeued attempts of another partition, sent on to it
