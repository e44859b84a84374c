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
    unroutable_assignments: int = 0
    returned_strays: int = 0  # requeued attempts of another partition, sent on to it
