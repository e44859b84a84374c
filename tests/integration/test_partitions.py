"""Scheduler partitions against the real broker: each partition has its own leader, and they share the workers.

Two partitions (SLUICEGATE_PARTITIONS=2): tasks of tenants in both complete exactly once; killing
one partition's leader hands it to its standby while the other keeps scheduling; two partitions
assigning to the same workers never put more tasks on a worker than its slots (counted in the
handlers, on the worker's side), and the requeues that sharing costs are measured and printed.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import pytest

from sluicegate import amqp
from sluicegate.client import TaskSpec
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually, stack_on
from .helpers import results_of

pytestmark = pytest.mark.timeout(120)


def named(partition: int, partitions: int = 2, stem: str = "tenant") -> str:
    """The first name `stem-N` that hashes to `partition`."""
    return next(f"{stem}-{i}" for i in range(1000) if amqp.partition_of(f"{stem}-{i}", partitions) == partition)


def key_of(partition: int, tenant: str, partitions: int = 2) -> str:
    return next(f"k{i}" for i in range(1000) if amqp.partition_of(tenant, partitions, f"k{i}") == partition)


@pytest.fixture
async def parted(broker: BrokerSettings) -> AsyncIterator[Stack]:
    async with stack_on(broker.model_copy(update={"partitions": 2})) as s:
        yield s


class Slots:
    """Handlers that count, per worker, how many of its tasks run at once (the worker's side of the story)."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.runs: Counter[str] = Counter()  # task id -> handler runs

    def worker(self, address: str, worker_id: str, slots: int, tenant: str) -> Worker:
        worker = Worker(address, slots=slots, worker_id=worker_id, tenant=tenant)
        worker.register("work", self._handle)
        return worker

    async def _handle(self, ctx: TaskContext) -> bytes:
        self.runs[ctx.task_id] += 1
        self.running[ctx.worker_id] += 1
        self.peak[ctx.worker_id] = max(self.peak[ctx.worker_id], self.running[ctx.worker_id])
        try:
            await asyncio.sleep(self.hold)
        finally:
            self.running[ctx.worker_id] -= 1
        return b"ok"


async def test_tasks_of_tenants_in_both_partitions_complete_exactly_once(parted: Stack) -> None:
    t0, t1 = named(0), named(1)
    first = await parted.start_scheduler(partition=0)
    second = await parted.start_scheduler(partition=1)
    await eventually(lambda: first.leading.is_set() and second.leading.is_set())
    dispatcher = await parted.start_dispatcher()
    handlers = Slots(hold=0.0)
    for tenant in (t0, t1):
        await parted.start_worker(
            dispatcher, f"w-{tenant}", worker=handlers.worker(parted.address(dispatcher), f"w-{tenant}", 8, tenant)
        )
    client = await parted.client()
    ids = await client.submit_many([TaskSpec("work", tenant=t, payload=str(i)) for i in range(150) for t in (t0, t1)])
    results = await results_of(client, ids, timeout=60)
    assert {r.task_id for r in results} == set(ids)
    assert all(handlers.runs[i] == 1 for i in ids), "every task ran exactly once"
    assert client.duplicates == 0
    # Each partition placed its own tenant's tasks, and only those.
    assert first.stats.assigned == 150
    assert second.stats.assigned == 150


async def test_killing_one_partitions_leader_hands_it_to_its_standby_while_the_other_keeps_scheduling(
    parted: Stack,
) -> None:
    t0, t1 = named(0), named(1)
    leader = await parted.spawn_scheduler(partition="0")
    await leader.until(lambda m: m.get(("sluicegate_leading", ()), 0) == 1)
    standby = await parted.spawn_scheduler(partition="0")
    other = await parted.start_scheduler(partition=1)
    await eventually(lambda: other.leading.is_set())
    assert (await standby.metrics()).get(("sluicegate_leading", ()), 0) == 0
    dispatcher = await parted.start_dispatcher()
    parted.dispatchers_ids.append(dispatcher.id)
    handlers = Slots(hold=0.0)
    for tenant in (t0, t1):
        await parted.start_worker(
            dispatcher, f"w-{tenant}", worker=handlers.worker(parted.address(dispatcher), f"w-{tenant}", 8, tenant)
        )
    await leader.wait_workers_known(2)
    await standby.wait_workers_known(2)
    client = await parted.client()
    before = await client.submit_many(
        [TaskSpec("work", tenant=t, payload="before") for _ in range(20) for t in (t0, t1)]
    )
    await results_of(client, before, timeout=30)

    # Partition 1 keeps a steady stream going while partition 0 loses its leader.
    steady: list[tuple[float, str]] = []

    async def submit_steadily() -> None:
        for _ in range(40):
            steady.append((time.monotonic(), await client.submit("work", "steady", tenant=t1)))
            await asyncio.sleep(0.05)

    stream = asyncio.create_task(submit_steadily())
    await asyncio.sleep(0.5)
    killed_at = time.monotonic()
    await leader.stop(signal.SIGKILL)
    after = await client.submit_many([TaskSpec("work", tenant=t0, payload="after") for _ in range(20)])
    await stream
    await standby.until(lambda m: m.get(("sluicegate_leading", ()), 0) == 1, timeout=20)
    results = await results_of(client, after + [task_id for _, task_id in steady], timeout=30)
    assert len(results) == len(after) + len(steady)
    took_over = time.monotonic() - killed_at
    # The other partition never stopped: tasks submitted right after the kill finished promptly.
    during = [task_id for at, task_id in steady if killed_at <= at <= killed_at + 1.0]
    assert during, "tasks of partition 1 were submitted during the takeover"
    finished = {r.task_id: r for r in results}
    for task_id in during:
        result = finished[task_id]
        assert result.finished_at_ms - result.submitted_at_ms < 2000, "partition 1 kept scheduling during the takeover"
    assert all(handlers.runs[i] == 1 for i in after + before), "partition 0's tasks each ran once"
    print(f"\npartition 0's standby led and placed everything within {took_over:.1f}s of the kill")


async def test_two_partitions_sharing_workers_never_overfill_a_worker_and_requeues_are_measured(parted: Stack) -> None:
    tenant = "shared"
    k0, k1 = key_of(0, tenant), key_of(1, tenant)
    first = await parted.start_scheduler(partition=0)
    second = await parted.start_scheduler(partition=1)
    await eventually(lambda: first.leading.is_set() and second.leading.is_set())
    dispatcher = await parted.start_dispatcher()
    handlers = Slots(hold=0.01)
    slots = {"w1": 2, "w2": 3, "w3": 1}
    for worker_id, count in slots.items():
        await parted.start_worker(
            dispatcher, worker_id, worker=handlers.worker(parted.address(dispatcher), worker_id, count, tenant)
        )
    await eventually(lambda: sum(w.ready for w in first.pool) == 3 and sum(w.ready for w in second.pool) == 3)
    client = await parted.client()
    count = 600
    specs = [TaskSpec("work", tenant=tenant, partition_key=k0 if i % 2 else k1) for i in range(count)]
    ids = await client.submit_many(specs)
    results = await results_of(client, ids, timeout=90)
    assert {r.task_id for r in results} == set(ids)
    requeues = first.stats.requeued + second.stats.requeued
    twice = {i: handlers.runs[i] for i in ids if handlers.runs[i] != 1}
    assert not twice, f"every task ran exactly once: {twice}, requeues {dict(requeues)}"
    for worker_id, most in slots.items():
        assert 0 < handlers.peak[worker_id] <= most, f"{worker_id} ran {handlers.peak[worker_id]} at once"
    # Both partitions placed on the same workers.
    assert first.stats.assigned >= count // 2
    assert second.stats.assigned >= count // 2
    assigned = first.stats.assigned + second.stats.assigned
    rate = sum(requeues.values()) / count
    print(
        f"\ntwo partitions, 3 shared workers ({sum(slots.values())} slots), {count} tasks of 10 ms: "
        f"{assigned} assignments, requeues {dict(requeues)}, requeue rate {rate:.1%} per task; "
        f"peak per worker {dict(handlers.peak)} (slots {slots})"
    )
    assert set(requeues) <= {"no_slot"}, "sharing only ever costs NO_SLOT requeues"
    # The dispatcher sent each partition's requeues straight back to it, none through partition 0.
    assert first.stats.returned_strays == 0
    assert second.stats.returned_strays == 0


async def test_another_partitions_attempt_dead_lettered_to_partition_0_is_sent_on_to_its_partition(
    parted: Stack,
) -> None:
    t1 = named(1)
    first = await parted.start_scheduler(partition=0)
    second = await parted.start_scheduler(partition=1)
    await eventually(lambda: first.leading.is_set() and second.leading.is_set())
    dispatcher = await parted.start_dispatcher()
    handlers = Slots(hold=0.0)
    worker = handlers.worker(parted.address(dispatcher), "w1", 4, t1)
    await parted.start_worker(dispatcher, "w1", worker=worker)
    await eventually(lambda: sum(w.ready for w in second.pool) == 1)
    client = await parted.client()
    # What the broker dead-letters from a dead dispatcher's inbox: an assignment of partition 1,
    # on the one exchange every inbox dead-letters to, partition 0's `requeue` (no reason header).
    task = messages_pb2.Task(
        task_id=uuid.uuid4().hex, tenant=t1, action="work", payload=b"x", reply_to=client.client_id,
        submitted_at_ms=now_ms(),
    )  # fmt: skip
    lost = messages_pb2.Assignment(task=task, attempt=1, worker_id="gone", session_id="gone", partition=1)
    connection = await aio_pika.connect(parted.broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(amqp.Topology(parted.broker.prefix).requeue)
        await amqp.publish(exchange, "", messages_pb2.AssignmentBatch(assignments=[lost]).SerializeToString())
    (result,) = await results_of(client, [task.task_id], timeout=30)
    assert result.status == messages_pb2.TASK_STATUS_COMPLETED
    assert handlers.runs[task.task_id] == 1
    assert first.stats.returned_strays == 1, "partition 0 sent it on"
    assert first.stats.assigned == 0, "and did not place it itself"
    assert second.stats.requeued["lease_expired"] == 1, "partition 1 took it as the broker's requeue"
    assert second.stats.assigned == 1
