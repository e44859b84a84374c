"""The scheduler's Prometheus metrics, read from its counters, lanes and view when scraped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from sluicegate.metrics import BATCH_BUCKETS, Snapshot, counter, gauge, histogram, labelled_counter
from sluicegate.wire import now_ms

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
        core = s.core
        workers = list(s.pool)
        yield counter("sluicegate_tasks_received", "Tasks taken from the intake queues.", stats.received)
        yield counter("sluicegate_tasks_assigned", "Assignments published and confirmed.", stats.assigned)
        yield labelled_counter(
            "sluicegate_requeues", "Assignments that came back, by reason.", "reason", stats.requeued
        )
        yield counter("sluicegate_dead_tasks", "Tasks moved to the dead queue after their attempts.", stats.dead)
        yield counter("sluicegate_rejected_tasks", "Malformed tasks moved to the dead queue.", stats.rejected)
        yield counter("sluicegate_expired_tasks", "Tasks not started within their schedule timeout.", stats.expired)
        yield counter(
            "sluicegate_duplicate_requeues", "Requeues of an attempt already handled.", stats.duplicate_requeues
        )
        yield gauge("sluicegate_leading", "1 while this scheduler holds the lead.", float(s.leading.is_set()))
        yield gauge("sluicegate_scheduler_partition", "The partition it leads or stands by for.", core.config.partition)
        yield counter(
            "sluicegate_returned_strays", "Requeued attempts of another partition sent on to it.", stats.returned_strays
        )
        yield gauge(
            "sluicegate_known_workers", "Workers in the scheduler's view that take work.", sum(w.ready for w in workers)
        )
        yield gauge(
            "sluicegate_view_free_slots", "Free slots as the scheduler estimates them.", sum(w.free for w in workers)
        )
        yield gauge("sluicegate_lanes", "Lanes known this session.", len(core.book))
        yield gauge("sluicegate_held_bytes", "Bytes of tasks held in memory.", core.book.held_bytes)
        depth = GaugeMetricFamily(
            "sluicegate_lane_depth", "Tasks waiting in lanes, by tenant and action.", labels=["tenant", "action"]
        )
        oldest = GaugeMetricFamily(
            "sluicegate_lane_oldest_seconds",
            "Age of the oldest task waiting in a lane, by tenant and action.",
            labels=["tenant", "action"],
        )
        by_work: Counter[tuple[str, str]] = Counter()
        oldest_ms: dict[tuple[str, str], int] = {}
        waiting: Counter[str] = Counter()
        for lane in core.book:
            work = (lane.key.tenant, lane.key.action)
            by_work[work] += lane.depth
            stamp = lane.oldest_ms()
            if stamp:
                oldest_ms[work] = min(stamp, oldest_ms.get(work, stamp))
            if lane.depth:
                served = s.pool.serves(*work)
                why = "no_worker" if not served else core.placement.blocked.get(lane.name, "busy")
                waiting[why] += lane.depth
        waiting["delayed"] += core.delayed
        now = now_ms()
        for (tenant, action), count in sorted(by_work.items()):
            depth.add_metric([tenant, action], count)
            if (tenant, action) in oldest_ms:
                oldest.add_metric([tenant, action], max(0.0, (now - oldest_ms[(tenant, action)]) / 1000))
        yield depth
        yield oldest
        reasons = GaugeMetricFamily(
            "sluicegate_waiting_tasks",
            "Tasks waiting, by why: no_worker (nobody serves the action), at_limit, busy (workers full), delayed.",
            labels=["reason"],
        )
        for reason in ("no_worker", "at_limit", "busy", "delayed"):
            reasons.add_metric([reason], waiting[reason])
        yield reasons
        yield from s.lifecycle.metrics()
