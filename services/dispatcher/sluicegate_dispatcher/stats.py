"""Counters a dispatcher keeps about what it did; tests, the demo and metrics read them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class DispatcherStats:
    forwarded: int = 0
    completed: int = 0
    failed: int = 0
    retries_exhausted: int = 0  # failed with no retry left (also counted in failed), recorded in dead
    expired: int = 0  # not started within the schedule-to-start timeout
    requeued: Counter[str] = field(default_factory=Counter)
    lock_timeouts: int = 0
    # A send lock timed out while the worker had read everything written to it: it waited on.
    lock_waits_extended: int = 0
    streams_ended: int = 0
    stale_reports: int = 0
    redeliveries: int = 0
    results_unclaimed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    invalid_cancels: int = 0  # cancellations dropped: they name no task a client could submit
    duplicate_assignments: int = 0  # the same (task, attempt) twice in one inbox message: the copy settled
    refused: Counter[str] = field(default_factory=Counter)  # calls refused: unauthenticated, permission_denied
