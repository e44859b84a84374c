"""The measured runs, from the producer's side: closed-loop throughput and open-loop latency.

Every task is the no-op with a 512-byte payload whose first 8 bytes are its scheduled send time;
the worker's handler returns that time and the time it started. Latency is taken from the
*scheduled* send time (open loop, no coordinated omission): a submission that went out late
because the producer fell behind counts as late.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.fleet import NOOP_ACTION, make_payload, read_output
from sluicegate.client import Client, TaskSpec
from sluicegate.report import percentile
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2


class BenchClient(Client):
    """A `Client` that also notes when each result arrived (wall clock, as the workers stamp theirs)."""

    def __init__(self, broker: BrokerSettings) -> None:
        super().__init__(broker)
        self.arrivals: dict[str, float] = {}
        self._pending: set[str] = set()
        self._all_in = asyncio.Event()

    def expect(self, task_ids: Iterable[str]) -> None:
        self._pending.update(task_ids)
        self._all_in.clear()

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        before = len(self.results)
        await super()._on_result(message)
        added = len(self.results) - before
        if added:
            now = time.time()
            for task_id in itertools.islice(reversed(self.results), added):
                self.arrivals[task_id] = now
                self._pending.discard(task_id)
            if not self._pending:
                self._all_in.set()

    async def wait_all(self, timeout: float) -> bool:
        """Wait until every expected result is in; False if some are still missing at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._pending:
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_in.wait(), min(left, 1.0))
        return True


@dataclass(slots=True)
class Sample:
    task_id: str
    scheduled: float  # when it was meant to be sent (unix seconds)
    started: float | None  # handler start on the worker
    arrived: float | None  # result back at the client
    worker_id: str
    attempt: int
    requeued_at: float | None  # the last requeue record's time, if it was requeued
    reasons: tuple[str, ...]
    ok: bool

    @classmethod
    def from_row(cls, row: list[Any]) -> Sample:
        """A sample from its fields in order, as `dataclasses.astuple` gives them and JSON keeps them."""
        task_id, scheduled, started, arrived, worker_id, attempt, requeued_at, reasons, ok = row
        return cls(task_id, scheduled, started, arrived, worker_id, attempt, requeued_at, tuple(reasons), ok)

    @property
    def receipt_ms(self) -> float | None:
        return None if self.started is None else (self.started - self.scheduled) * 1000

    @property
    def result_ms(self) -> float | None:
        return None if self.arrived is None else (self.arrived - self.scheduled) * 1000


@dataclass(slots=True)
class Distribution:
    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99), max(values))

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max}


@dataclass(slots=True)
class RunResult:
    name: str
    submitted: int
    started_at: float
    samples: list[Sample] = field(default_factory=list)
    offered_rate: float = 0.0
    send_lag_ms: float = 0.0  # how far behind its timetable the producer fell at worst

    @property
    def received(self) -> int:
        return len(self.samples)

    @property
    def last_arrival(self) -> float:
        return max((s.arrived for s in self.samples if s.arrived is not None), default=self.started_at)

    @property
    def elapsed(self) -> float:
        return self.last_arrival - self.started_at

    @property
    def throughput(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    def receipt(self, keep: Callable[[Sample], bool] = lambda s: True) -> Distribution:
        return Distribution.of([v for s in self.samples if keep(s) and (v := s.receipt_ms) is not None])

    def result(self, keep: Callable[[Sample], bool] = lambda s: True) -> Distribution:
        return Distribution.of([v for s in self.samples if keep(s) and (v := s.result_ms) is not None])


def _collect(client: BenchClient, name: str, scheduled: dict[str, float], started_at: float) -> list[Sample]:
    samples = []
    for task_id, when in scheduled.items():
        result = client.results.get(task_id)
        if result is None:
            continue
        stamps = read_output(result.output)
        history = list(result.history)
        samples.append(
            Sample(
                task_id=task_id,
                scheduled=when,
                started=stamps[1] if stamps else None,
                arrived=client.arrivals.get(task_id),
                worker_id=result.worker_id,
                attempt=result.attempt,
                requeued_at=history[-1].at_ms / 1000 if history else None,
                reasons=tuple(r.reason for r in history),
                ok=result.status == messages_pb2.TASK_STATUS_COMPLETED,
            )
        )
    return samples


async def closed_loop(
    client: BenchClient, name: str, tasks: int, payload_bytes: int, timeout: float, *, batch_size: int = 100
) -> RunResult:
    """Submit `tasks` at once (batched by the Client, as `submit_many` does), wait for every result."""
    started = time.time()
    ids = [f"{name}-{i}" for i in range(tasks)]
    scheduled = dict.fromkeys(ids, started)
    payload = make_payload(started, payload_bytes)
    client.expect(ids)
    await client.submit_many([TaskSpec(NOOP_ACTION, payload, task_id=i) for i in ids], batch_size=batch_size)
    await client.wait_all(timeout)
    return RunResult(name, tasks, started, _collect(client, name, scheduled, started))


async def broker_version(url: str) -> str:
    """The broker's product version from its connection handshake."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(url, timeout=5)
        async with connection:
            transport: Any = connection.transport
            props = transport.connection.server_properties
            version = props.get("version", b"?")
            product = props.get("product", b"RabbitMQ")
            as_text = [v.decode() if isinstance(v, bytes) else str(v) for v in (product, version)]
            return " ".join(as_text)
    return "unknown"
