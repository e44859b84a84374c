"""What the CLI prints: a progress bar while results come in, and a summary when they have."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import IO

from sluicegate.client import Client, TaskResult
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def status_name(status: int) -> str:
    return messages_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_").lower()  # type: ignore[arg-type]


def summarize(results: dict[str, TaskResult], submitted: int, elapsed: float) -> str:
    by_status = Counter(status_name(r.status) for r in results.values())
    latencies = [r.finished_at_ms - r.submitted_at_ms for r in results.values() if r.finished_at_ms]
    missing = submitted - len(results)
    parts = [f"{name} {count}" for name, count in sorted(by_status.items())]
    if missing:
        parts.append(f"no result yet {missing}")
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    return (
        f"{submitted} submitted: {', '.join(parts) or 'nothing back'}; "
        f"latency p50 {percentile(latencies, 50):.0f} ms, p99 {percentile(latencies, 99):.0f} ms; "
        f"{elapsed:.1f} s, {rate:.0f} tasks/s"
    )


class Progress:
    """A one-line progress bar, redrawn in place on a terminal and every 10 % elsewhere."""

    def __init__(self, total: int, out: IO[str], width: int = 30) -> None:
        self.total, self.out, self.width = total, out, width
        self._last_step = -1

    def draw(self, done: int) -> None:
        tty = self.out.isatty()
        step = done * 10 // max(1, self.total)
        if not tty and step == self._last_step and done != self.total:
            return
        self._last_step = step
        filled = done * self.width // max(1, self.total)
        bar = "#" * filled + "." * (self.width - filled)
        start, end = ("\r", "") if tty else ("", "\n")
        self.out.write(f"{start}[{bar}] {done}/{self.total}{end}")
        if tty and done == self.total:
            self.out.write("\n")
        self.out.flush()

    async def collect(self, client: Client, ids: Sequence[str], timeout: float) -> dict[str, TaskResult]:
        """Wait for every result (or the timeout), drawing progress; returns what arrived."""
        deadline = now_ms() + timeout * 1000
        wanted = set(ids)
        while True:
            got = {i: client.results[i] for i in wanted if i in client.results}
            self.draw(len(got))
            if len(got) == len(wanted) or now_ms() > deadline:
                return got
            await asyncio.sleep(0.1)
