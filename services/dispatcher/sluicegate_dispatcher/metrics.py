"""The dispatcher's Prometheus metrics: histograms observed on the way, everything else read at scrape."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from sluicegate.lifecycle import LifecycleEmitter
from sluicegate.metrics import (
    BATCH_BUCKETS,
    FAST_BUCKETS,
    LATENCY_BUCKETS,
    Snapshot,
    counter,
    gauge,
    histogram,
    labelled_counter,
)
from sluicegate_dispatcher.sessions import Sessions
from sluicegate_dispatcher.stats import DispatcherStats


class DispatcherMetrics:
    def __init__(self, sessions: Sessions, stats: DispatcherStats, emitter: LifecycleEmitter) -> None:
        self._sessions, self._stats, self._emitter = sessions, stats, emitter
        self.registry = CollectorRegistry()
        r = self.registry
        self.lock_wait = histogram(
            r, "sluicegate_send_lock_wait_seconds", "Wait for a worker's send lock, timeouts included.", FAST_BUCKETS
        )
        self.stream_write = histogram(
            r, "sluicegate_stream_write_seconds", "Duration of one write to a worker stream.", FAST_BUCKETS
        )
        self.receipt_ack = histogram(
            r,
            "sluicegate_receipt_ack_seconds",
            "From forwarding an assignment to the worker's receipt.",
            LATENCY_BUCKETS,
        )
        self.task_latency = histogram(
            r, "sluicegate_task_latency_seconds", "From submit to the terminal result.", LATENCY_BUCKETS
        )
        batch_size = histogram(
            r, "sluicegate_batch_size", "Items per AMQP message, by kind.", BATCH_BUCKETS, labels=["kind"]
        )
        self.assignment_batch = batch_size.labels(kind="assignments")
        self.result_batch = batch_size.labels(kind="results")
        r.register(Snapshot(self._snapshot))

    def _snapshot(self) -> Iterable[Metric]:
        stats = self._stats
        sessions = list(self._sessions)
        yield gauge(
            "sluicegate_connected_workers",
            "Workers streaming from this dispatcher.",
            sum(s.streaming for s in sessions),
        )
        slots = GaugeMetricFamily("sluicegate_worker_slots", "Slots of connected workers.", labels=["state"])
        slots.add_metric(["total"], sum(s.slots for s in sessions))
        slots.add_metric(["free"], sum(s.worker_room for s in sessions))
        yield slots
        yield gauge(
            "sluicegate_worker_queued",
            "Assignments waiting here for a free slot of their worker (the per-worker prefetch).",
            sum(s.queued for s in sessions),
        )
        yield gauge("sluicegate_leases_in_flight", "Assignments forwarded and not yet settled.", self._sessions.leases)
        yield counter(
            "sluicegate_send_lock_timeouts", "Sends that did not get the stream's lock in time.", stats.lock_timeouts
        )
        yield counter(
            "sluicegate_send_lock_waits_extended",
            "Lock timeouts on the stream of a worker that had read everything written to it: the send waited on.",
            stats.lock_waits_extended,
        )
        yield labelled_counter(
            "sluicegate_requeues", "Assignments sent back to the scheduler.", "reason", stats.requeued
        )
        yield labelled_counter(
            "sluicegate_tasks_completed",
            "Tasks this dispatcher gave a terminal result, by status.",
            "status",
            {"completed": stats.completed, "failed": stats.failed, "expired": stats.expired},
        )
        yield counter(
            "sluicegate_retries_exhausted",
            "Tasks that failed with no retry left (also recorded in the dead queue).",
            stats.retries_exhausted,
        )
        yield counter("sluicegate_tasks_forwarded", "Assignments written to a worker stream.", stats.forwarded)
        yield counter("sluicegate_stale_reports", "Reports rejected for attempts no longer held.", stats.stale_reports)
        yield counter("sluicegate_streams_ended", "Streams ended because their worker stalled.", stats.streams_ended)
        yield counter("sluicegate_results_unclaimed", "Results whose client had gone.", stats.results_unclaimed)
        yield labelled_counter(
            "sluicegate_calls_refused",
            "gRPC calls refused for their credentials, by code (unauthenticated, permission_denied).",
            "code",
            {code: stats.refused[code] for code in ("unauthenticated", "permission_denied")},
        )
        yield from self._emitter.metrics()
