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
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError

from bench.fleet import NOOP_ACTION, make_payload, read_output
from sluicegate import amqp
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
        self._hooked = False

    def expect(self, task_ids: Iterable[str]) -> None:
        self._pending.update(task_ids)
        self._all_in.clear()

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        self._hooked = True
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

    def _sweep(self) -> None:
        """Fallback for a Client whose result hook changed: stamp what arrived since the last sweep."""
        now = time.time()
        for task_id in [t for t in self._pending if t in self.results]:
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
                await asyncio.wait_for(self._all_in.wait(), min(left, 0.05 if not self._hooked else 1.0))
            if not self._hooked and self.results:
                self._sweep()
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


async def open_loop(
    client: BenchClient,
    name: str,
    rate: float,
    duration: float,
    payload_bytes: int,
    timeout: float,
) -> RunResult:
    """Submit on a fixed timetable of `rate` tasks/s for `duration` s, whatever comes back; then wait.

    Whatever is due when the producer wakes goes out in one submit (one AMQP message); each
    submit is its own task, so a slow confirm never holds back the timetable.
    """
    count = max(1, round(rate * duration))
    origin = time.time() + 0.05
    scheduled: dict[str, float] = {}
    in_flight: set[asyncio.Task[list[str]]] = set()
    failures: list[BaseException] = []
    worst_lag = 0.0
    sent = 0

    def settled(task: asyncio.Task[list[str]]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    while sent < count:
        now = time.time()
        due = min(count, math.floor((now - origin) * rate) + 1) if now >= origin else 0
        if due > sent:
            worst_lag = max(worst_lag, now - (origin + sent / rate))
            specs = []
            for k in range(sent, due):
                when = origin + k / rate
                task_id = f"{name}-{k}"
                scheduled[task_id] = when
                specs.append(TaskSpec(NOOP_ACTION, make_payload(when, payload_bytes), task_id=task_id))
            client.expect(s.task_id for s in specs)
            task = asyncio.create_task(client.submit_many(specs))
            in_flight.add(task)
            task.add_done_callback(settled)
            sent = due
        if sent < count:
            await asyncio.sleep(max(0.0, origin + sent / rate - time.time()))
    if in_flight:
        await asyncio.wait(set(in_flight))
    if failures:
        raise failures[0]
    await client.wait_all(timeout)
    result = RunResult(name, count, origin, _collect(client, name, scheduled, origin))
    result.offered_rate = rate
    result.send_lag_ms = worst_lag * 1000
    return result


class StateWatcher:
    """Follows one dispatcher's worker-state snapshots: how many workers are connected and ready."""

    def __init__(self, broker: BrokerSettings, dispatcher_id: str) -> None:
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix)
        self.dispatcher_id = dispatcher_id
        self.workers = 0
        self.ready = 0
        self._changed = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await amqp.connect(self.broker.urls, deadline=10)
        channel = await self._connection.channel()
        exchanges = await amqp.Exchanges(self.topology).declare(channel)
        queue = await channel.declare_queue(
            f"{self.broker.prefix}.bench.state.{self.dispatcher_id}", durable=False, exclusive=True, auto_delete=True
        )
        await queue.bind(exchanges.events, routing_key=self.topology.state_key(self.dispatcher_id))
        await queue.consume(self._on_state, no_ack=True)

    async def _on_state(self, message: AbstractIncomingMessage) -> None:
        try:
            state = messages_pb2.DispatcherState.FromString(message.body)
        except DecodeError:
            return
        self.workers = len(state.workers)
        self.ready = sum(w.ready for w in state.workers)
        self._changed.set()

    async def wait_ready(self, count: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.ready < count:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        return True

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


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
