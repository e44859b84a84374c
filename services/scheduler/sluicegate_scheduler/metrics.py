"""The scheduler's Prometheus metrics, read from its counters and view when scraped."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from sluicegate.metrics import BATCH_BUCKETS, Snapshot, counter, gauge, histogram, labelled_counter

if TYPE_CHECKING:
    from sluicegate_scheduler.app import Scheduler


class SchedulerMetrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler
        self.registry = CollectorRegistry()
        self.batch_size = histogram(
            self.registry, "sluicegate_batch_size", "Items per AMQP message, by kind.", BATCH_BUCKETS, labels=["kind"]
        ).labels(kind="assignments")
        self.registry.register(Snapshot(self._snapshot))

    def _snapshot(self) -> Iterable[Metric]:
        s, stats = self._s, self._s.stats
        workers = list(s.pool)
        yield counter("sluicegate_tasks_received", "Tasks taken from the tasks queue.", stats.received)
        yield counter("sluicegate_tasks_assigned", "Assignments published and confirmed.", stats.assigned)
        yield labelled_counter(
            "sluicegate_requeues", "Assignments that came back, by reason.", "reason", stats.requeued
        )
        yield counter("sluicegate_dead_tasks", "Tasks moved to the dead queue after their attempts.", stats.dead)
        yield counter("sluicegate_rejected_tasks", "Malformed tasks moved to the dead queue.", stats.rejected)
        yield counter(
            "sluicegate_duplicate_requeues", "Requeues of an attempt already handled.", stats.duplicate_requeues
        )
        yield gauge("sluicegate_waiting_tasks", "Tasks waiting for a worker.", len(s.waiting))
        yield gauge(
            "sluicegate_known_workers", "Workers in the scheduler's view that take work.", sum(w.ready for w in workers)
        )
        yield gauge(
            "sluicegate_view_free_slots", "Free slots as the scheduler estimates them.", sum(w.free for w in workers)
        )
