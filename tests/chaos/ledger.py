"""The Jepsen-style ledger: what was submitted, what came back, what was requeued, and the summary of it all.

Times are wall-clock milliseconds (`now_ms`), so that stamps taken in subprocesses and in the
messages themselves (`Requeue.at_ms`, `TaskResult.finished_at_ms`) compare with ours.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sluicegate.report import percentile
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED
STATUS = {1: "completed", 2: "failed", 3: "dead", 4: "rejected"}


@dataclass(slots=True)
class Published:
    """One terminal result as the broker carried it (deduplicated by AMQP message id)."""

    result: messages_pb2.TaskResult
    seen_ms: int


@dataclass(slots=True)
class RequeueSeen:
    """An attempt given back to the scheduler: it is superseded from then on."""

    task_id: str
    attempt: int
    reason: str
    worker_id: str
    assigned_ms: int
    seen_ms: int
    requeued_ms: int  # when it was superseded: the dispatcher's own record, else when it was seen


@dataclass
class Ledger:
    """Every fact a scenario observes, recorded as it happens."""

    submitted: dict[str, int] = field(default_factory=dict)  # task id -> when the submit was issued
    confirmed: dict[str, int] = field(default_factory=dict)  # task id -> when the broker confirmed it
    results: dict[str, list[Published]] = field(default_factory=lambda: defaultdict(list))
    requeues: dict[tuple[str, int], RequeueSeen] = field(default_factory=dict)
    requeue_copies: int = 0  # the same (task, attempt) requeued more than once
    dead: dict[str, messages_pb2.DeadLetter] = field(default_factory=dict)
    starts: dict[str, list[tuple[int, str, int]]] = field(default_factory=lambda: defaultdict(list))
    faults: list[tuple[int, str]] = field(default_factory=list)
    last_activity_ms: int = 0

    # Recording.

    def fault(self, name: str) -> int:
        at = now_ms()
        self.faults.append((at, name))
        return at

    def on_submit(self, ids: list[str]) -> None:
        at = now_ms()
        for task_id in ids:
            self.submitted[task_id] = at

    def on_confirm(self, ids: list[str]) -> None:
        at = now_ms()
        for task_id in ids:
            self.confirmed[task_id] = at

    def on_result(self, result: messages_pb2.TaskResult) -> None:
        self.results[result.task_id].append(Published(result, now_ms()))
        self.last_activity_ms = now_ms()

    def on_requeue(self, assignment: messages_pb2.Assignment, reason: str) -> None:
        key = (assignment.task.task_id, assignment.attempt)
        if key in self.requeues:
            self.requeue_copies += 1
            return
        seen = now_ms()
        last = assignment.history[-1] if assignment.history else None
        self.requeues[key] = RequeueSeen(
            task_id=key[0],
            attempt=key[1],
            reason=reason,
            worker_id=assignment.worker_id,
            assigned_ms=assignment.assigned_at_ms,
            seen_ms=seen,
            requeued_ms=min(seen, last.at_ms) if last is not None and last.attempt == key[1] else seen,
        )
        self.last_activity_ms = now_ms()

    def on_dead(self, dead: messages_pb2.DeadLetter) -> None:
        self.dead.setdefault(dead.task.task_id, dead)

    def on_start(self, task_id: str, attempt: int, worker_id: str) -> None:
        self.starts[task_id].append((attempt, worker_id, now_ms()))

    # Questions a scenario asks while it runs.

    def settled(self) -> bool:
        """Every confirmed task has a terminal result."""
        return all(task_id in self.results for task_id in self.confirmed)

    def missing(self) -> list[str]:
        return [task_id for task_id in self.confirmed if task_id not in self.results]

    def first(self, task_id: str) -> messages_pb2.TaskResult | None:
        published = self.results.get(task_id)
        return published[0].result if published else None

    # The verdict.

    def stale_completions(self) -> list[tuple[str, int]]:
        """Completions accepted for an attempt after it had been superseded (requeued).

        A completion accepted before its attempt was requeued is not stale: if the dispatcher then
        died before settling its lease, the task runs again and both results are counted under
        `duplicated` (at-least-once). What must never happen is the fence failing: a dispatcher
        accepting the result of an attempt it had already given back.
        """
        stale: set[tuple[str, int]] = set()
        for task_id, published in self.results.items():
            for p in published:
                seen = self.requeues.get((task_id, p.result.attempt))
                if p.result.status == COMPLETED and seen is not None and p.result.finished_at_ms > seen.requeued_ms:
                    stale.add((task_id, p.result.attempt))
        return sorted(stale)

    def requeue_and_reassign_ms(self, reasons: set[str] | None = None) -> tuple[list[int], list[int]]:
        """How long after its attempt was doomed each requeue was seen, and the next attempt started.

        An attempt is doomed from the later of its assignment and the last fault injected before
        its requeue was seen. Reassignment is known only where the next attempt ran on an
        in-process (instrumented) worker.
        """
        fault_times = sorted(at for at, _ in self.faults)
        requeue: list[int] = []
        reassign: list[int] = []
        for seen in self.requeues.values():
            if seen.reason == "handler_failed" or (reasons is not None and seen.reason not in reasons):
                continue
            before = [at for at in fault_times if at <= seen.seen_ms]
            origin = max([seen.assigned_ms, *before[-1:]])
            requeue.append(max(0, seen.seen_ms - origin))
            later = [at for attempt, _, at in self.starts.get(seen.task_id, []) if attempt > seen.attempt]
            if later:
                reassign.append(max(0, min(later) - origin))
        return requeue, reassign


def flow_after(ledger: Ledger, windows: list[tuple[int, int]], lead_ms: int = 1000) -> dict[str, Any]:
    """How long tasks stopped flowing around faults, each window (start, end) in wall-clock ms.

    A task has flowed when its dispatcher accepted its result (`finished_at_ms`), whatever the
    witness's own connection was doing. `gap_ms` is the longest time within a window without any
    task finishing (from the fault to the first one after it counts; a window without any is all
    gap); `recovery_ms` spreads submit-to-finish of the tasks submitted from `lead_ms` before a
    window to its end: its p99 is how long a task caught by the fault waited for tasks to flow.
    """
    finished = {task_id: p[0].result.finished_at_ms or p[0].seen_ms for task_id, p in ledger.results.items() if p}
    times = sorted(finished.values())
    gaps: list[int] = []
    waited: list[int] = []
    for start, end in windows:
        inside = [t for t in times if start <= t <= end]
        gaps.append(max((b - a for a, b in itertools.pairwise([start, *inside])), default=end - start))
        for task_id, submitted in ledger.submitted.items():
            if start - lead_ms <= submitted <= end and task_id in finished:
                waited.append(max(0, finished[task_id] - submitted))
    return {"gap_ms": max(gaps, default=0), "recovery_ms": spread(waited)}


def spread(values: list[int] | list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


@dataclass
class Summary:
    """The figures of one scenario run, Jepsen style; `figures` is what RELIABILITY.md tabulates."""

    scenario: str
    size: str
    figures: dict[str, Any]

    @classmethod
    def of(
        cls,
        scenario: str,
        size: str,
        ledger: Ledger,
        *,
        duration_s: float,
        client_results: dict[str, Any] | None = None,
        client_duplicates: int | None = None,
        fenced: dict[str, int] | None = None,
        requeue_reasons: set[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Summary:
        firsts = {task_id: p[0].result for task_id, p in ledger.results.items() if p}
        by_status = Counter(
            STATUS.get(r.status, "other") for task_id, r in firsts.items() if task_id in ledger.submitted
        )
        duplicated = [task_id for task_id, p in ledger.results.items() if len(p) > 1]
        # Ran to completion twice: two completions by different (attempt, worker) pairs. The same
        # completion published twice (a publish retried after its confirm was lost) is one run,
        # counted under `duplicated` and deduplicated by the client.
        double_completed = [
            task_id
            for task_id, p in ledger.results.items()
            if len({(x.result.attempt, x.result.worker_id) for x in p if x.result.status == COMPLETED}) > 1
        ]
        latency = [r.finished_at_ms - r.submitted_at_ms for r in firsts.values() if r.finished_at_ms]
        requeue_ms, reassign_ms = ledger.requeue_and_reassign_ms(requeue_reasons)
        undelivered = None
        if client_results is not None:
            undelivered = sum(1 for task_id in ledger.confirmed if task_id in firsts and task_id not in client_results)
        finished = sorted(r.finished_at_ms for r in firsts.values() if r.finished_at_ms)
        # Over the central 80 % of completions: the steady rate, not the start-up or the last stragglers.
        low, high = finished[len(finished) // 10 :][:1], finished[: len(finished) - len(finished) // 10][-1:]
        central = len(finished) - 2 * (len(finished) // 10)
        rate = central / max(0.001, (high[0] - low[0]) / 1000) if len(finished) > 10 else 0.0
        figures: dict[str, Any] = {
            "submitted": len(ledger.submitted),
            "confirmed": len(ledger.confirmed),
            "completed": by_status["completed"],
            "failed": by_status["failed"],
            "dead": by_status["dead"],
            "rejected": by_status["rejected"],
            "lost": len(ledger.missing()),
            "lost_ids": ledger.missing()[:10],
            "undelivered_to_client": undelivered,
            "duplicated": len(duplicated),
            "duplicated_ids": duplicated[:10],
            "double_completed": len(double_completed),
            "client_duplicates": client_duplicates,
            "fenced": fenced or {},
            "stale_accepted": len(ledger.stale_completions()),
            "stale_ids": ledger.stale_completions()[:10],
            "requeued": dict(Counter(r.reason for r in ledger.requeues.values()).most_common()),
            "requeue_copies": ledger.requeue_copies,
            "time_to_requeue_ms": spread(requeue_ms),
            "time_to_reassign_ms": spread(reassign_ms),
            "latency_ms": spread(latency),
            "completion_rate_per_s": round(rate, 1),
            "faults": len(ledger.faults),
            "duration_s": round(duration_s, 1),
        }
        figures.update(extra or {})
        return cls(scenario, size, figures)

    def line(self) -> str:
        f = self.figures

        def ms(key: str) -> str:
            s = f.get(key)
            return "-" if not s else f"{s['p50']:.0f}/{s['p99']:.0f}/{s['max']:.0f}"

        fenced = "+".join(str(v) for v in f["fenced"].values()) or "-"
        return (
            f"{self.scenario}[{self.size}]: submitted {f['submitted']}, completed {f['completed']}, "
            f"failed {f['failed']}, dead {f['dead']}, lost {f['lost']}, undelivered {f['undelivered_to_client']}, "
            f"duplicated {f['duplicated']} (client {f['client_duplicates']}), fenced {fenced}, "
            f"stale accepted {f['stale_accepted']}, requeued {sum(f['requeued'].values())} {f['requeued']}, "
            f"requeue ms p50/p99/max {ms('time_to_requeue_ms')}, reassign ms {ms('time_to_reassign_ms')}, "
            f"latency ms {ms('latency_ms')}, {f['completion_rate_per_s']}/s, {f['duration_s']} s"
        )
