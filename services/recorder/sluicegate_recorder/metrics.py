"""The recorder's Prometheus metrics: histograms observed per transaction, the rest read at scrape."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from sluicegate.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Snapshot, counter, gauge, histogram, labelled_counter

if TYPE_CHECKING:
    from sluicegate_recorder.app import Recorder

EVENT_BUCKETS = (*BATCH_BUCKETS, 2048, 4096, 8192)


class RecorderMetrics:
    def __init__(self, recorder: Recorder) -> None:
        self._r = recorder
        self.registry = CollectorRegistry()
        self.batch_events = histogram(
            self.registry, "sluicegate_recorder_batch_events", "Events written per transaction.", EVENT_BUCKETS
        )
        self.commit_seconds = histogram(
            self.registry, "sluicegate_recorder_commit_seconds", "Duration of one write transaction.", LATENCY_BUCKETS
        )
        self.registry.register(Snapshot(self._snapshot))

    def _snapshot(self) -> Iterable[Metric]:
        stats = self._r.stats
        yield labelled_counter(
            "sluicegate_recorder_events",
            "Lifecycle events consumed: recorded, repeats already recorded, or invalid (left out).",
            "outcome",
            {"recorded": stats.recorded, "duplicate": stats.duplicates, "invalid": stats.invalid},
        )
        yield counter("sluicegate_recorder_transactions", "Write transactions committed.", stats.transactions)
        yield counter("sluicegate_recorder_store_errors", "Writes that failed and were retried.", stats.store_errors)
        yield counter("sluicegate_recorder_pruned_tasks", "Task records deleted by retention.", stats.pruned)
        yield gauge("sluicegate_recorder_held_messages", "Lifecycle messages received, not yet written.", self._r.held)
        yield gauge("sluicegate_recorder_store_up", "1 while the last write to the store succeeded.", self._r.store_up)
