"""Limits by key and affinity on a real broker: concurrency caps hold under load and through a killed
worker, rate limits pace starts, preferred labels and sticky keys steer tasks."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from sluicegate import amqp
from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2

from .conftest import Stack, eventually
from .helpers import Recorder, kill_worker, results_of

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


async def test_i_a_concurrency_cap_holds_under_load_and_its_slots_come_back_from_a_killed_worker(
    stack: Stack,
) -> None:
    scheduler = await stack.start_scheduler(concurrency="work=6,work:hot=3")
    dispatcher = await stack.start_dispatcher(reconnect_grace="300ms", heartbeat_timeout="2s")
    recorder = Recorder(hold=0.05)
    address = stack.address(dispatcher)
    workers = {}
    for name in ("w1", "w2", "w3"):
        workers[name] = await stack.start_worker(dispatcher, name, worker=recorder.worker(address, name, slots=16))
    await stack.wait_workers_known(3)
    client = await stack.client()

    hot = await client.submit_many([TaskSpec("work", b"hot", concurrency_key="hot") for _ in range(150)])
    warm = await client.submit_many([TaskSpec("work", b"warm", concurrency_key="warm") for _ in range(150)])
    free = await client.submit_many([TaskSpec("work", b"free") for _ in range(150)])

    # Kill a worker while it runs some of the capped key's tasks: their slots must come back.
    await eventually(
        lambda: len(recorder.finished) >= 30 and any(n for (_, g), n in recorder.by_worker.items() if g == "hot")
    )
    victim = next(w for (w, g), n in recorder.by_worker.items() if g == "hot" and n > 0)
    killed_with = recorder.by_worker[(victim, "hot")]
    await kill_worker(workers[victim])
    results = await results_of(client, hot + warm + free, 120)
    assert all(r.status == COMPLETED for r in results)
    print(f"\n(i) killed {victim} running {killed_with} of key hot; peaks: {dict(recorder.peak)}")
    assert recorder.peak["hot"] == 3, "the cap of the key holds, and is used"
    assert recorder.peak["warm"] == 6, "the action's cap holds for other keys"
    assert recorder.peak["free"] > 6, "tasks without a key are not capped"
    reran = [r for r in results if r.attempt > 1]
    assert any(r.task_id in hot for r in reran), "the killed worker's tasks of key hot ran again elsewhere"
    await eventually(lambda: scheduler.pool.running(("default", "work", "hot")) == 0, timeout=5)


@contextlib.asynccontextmanager
async def assignments_to(stack: Stack, dispatcher_id: str) -> AsyncIterator[list[messages_pb2.Assignment]]:
    """Every assignment published to a dispatcher from now on, seen through a private queue beside its inbox."""
    connection = await aio_pika.connect(stack.broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{stack.broker.prefix}.test.{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(amqp.Topology(stack.broker.prefix).assign, routing_key=dispatcher_id)
        seen: list[messages_pb2.Assignment] = []

        async def keep(message: AbstractIncomingMessage) -> None:
            await message.ack()
            seen.extend(messages_pb2.AssignmentBatch.FromString(message.body).assignments)

        await queue.consume(keep)
        yield seen


async def test_i_a_rate_limit_paces_the_starts_of_its_key_only(stack: Stack) -> None:
    await stack.start_scheduler(rate_limits="work:paced=10/1s")
    dispatcher = await stack.start_dispatcher()
    recorder = Recorder()
    await stack.start_worker(dispatcher, "w", worker=recorder.worker(stack.address(dispatcher), "w", slots=32))
    await stack.wait_workers_known(1)
    client = await stack.client()

    async with assignments_to(stack, dispatcher.id) as assigned:
        paced = await client.submit_many([TaskSpec("work", b"paced", concurrency_key="paced") for _ in range(40)])
        other = await client.submit_many([TaskSpec("work", b"other", concurrency_key="other") for _ in range(40)])
        results = await results_of(client, paced + other, 30)
        assert all(r.status == COMPLETED for r in results)
        await eventually(lambda: len(assigned) == 80)

    # When the scheduler placed them: a token bucket of 10, refilled at 10 a second, allows at most
    # 10 + 10 t placements in any t seconds.
    placed = sorted(a.assigned_at_ms for a in assigned if a.task.concurrency_key == "paced")
    for i, early in enumerate(placed):
        for j in range(i, len(placed)):
            assert j - i + 1 <= 10 + 10 * (placed[j] - early) / 1000 + 1e-9, (i, j, placed[j] - early)
    assert placed[-1] - placed[0] >= 2900, "the 30 past the first burst waited for 3 s of refill"
    first = recorder.first_start()
    starts = sorted(first[t].at_ms for t in paced)
    per_second = [sum(starts[0] + 1000 * s <= t < starts[0] + 1000 * (s + 1) for t in starts) for s in range(4)]
    print(f"\n(i) 40 tasks at 10/1s: placed over {(placed[-1] - placed[0]) / 1000:.2f} s, "
          f"started over {(starts[-1] - starts[0]) / 1000:.2f} s, starts per second {per_second}")  # fmt: skip
    assert starts[-1] - starts[0] >= 2500
    others = sorted(first[t].at_ms for t in other)
    assert others[-1] - others[0] < 2000, "another key is not paced"


async def test_j_preferred_labels_steer_tasks_to_the_matching_worker_while_it_has_room(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    recorder = Recorder()
    recorder.gate.clear()
    address = stack.address(dispatcher)
    labels = {
        "eu-cpu": {"zone": "eu", "gpu": "none"},
        "us-gpu": {"zone": "us", "gpu": "a100"},
        "us-cpu": {"zone": "us"},
    }
    for name, worker_labels in labels.items():
        await stack.start_worker(dispatcher, name, worker=recorder.worker(address, name, slots=8, labels=worker_labels))
    await stack.wait_workers_known(3)
    client = await stack.client()

    def where(ids: list[str]) -> Counter[str]:
        first = recorder.first_start()
        return Counter(first[t].worker_id for t in ids if t in first)

    # The heavier preference wins; each worker has room for all eight.
    gpu_first = await client.submit_many(
        [TaskSpec("work", b"", preferred={"zone=eu": 1, "gpu=a100": 5}) for _ in range(8)]
    )
    await eventually(lambda: sum(where(gpu_first).values()) == 8)
    eu_first = await client.submit_many(
        [TaskSpec("work", b"", preferred={"zone=eu": 5, "gpu=a100": 1}) for _ in range(8)]
    )
    await eventually(lambda: sum(where(eu_first).values()) == 8)
    assert where(gpu_first) == {"us-gpu": 8}
    assert where(eu_first) == {"eu-cpu": 8}
    # Preferred is not required: with the matching workers full, tasks go where there is room.
    overflow = await client.submit_many([TaskSpec("work", b"", preferred={"gpu=a100": 5}) for _ in range(8)])
    await eventually(lambda: sum(where(overflow).values()) == 8)
    assert where(overflow) == {"us-cpu": 8}
    recorder.gate.set()
    assert all(r.status == COMPLETED for r in await results_of(client, gpu_first + eu_first + overflow, 30))


async def test_j_a_sticky_key_keeps_to_its_worker_while_it_lives_and_moves_when_it_stops(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    recorder = Recorder(hold=0.02)
    address = stack.address(dispatcher)
    workers = {}
    for name in ("w1", "w2", "w3"):
        workers[name] = await stack.start_worker(dispatcher, name, worker=recorder.worker(address, name, slots=4))
    await stack.wait_workers_known(3)
    client = await stack.client()

    def where(ids: list[str]) -> Counter[str]:
        first = recorder.first_start()
        return Counter(first[t].worker_id for t in ids)

    # More tasks of each key than one worker has slots: they wait for their worker rather than spread.
    keys = ("customer-1", "customer-2", "customer-3", "customer-4")
    by_key = {key: await client.submit_many([TaskSpec("work", b"", sticky_key=key) for _ in range(12)]) for key in keys}
    loose = await client.submit_many([TaskSpec("work", b"") for _ in range(24)])
    await results_of(client, [t for ids in by_key.values() for t in ids] + loose, 60)
    homes = {}
    for key, ids in by_key.items():
        (home,) = where(ids)
        homes[key] = home
    print(f"\n(j) sticky homes {homes}; tasks without a key ran on {dict(where(loose))}")
    assert len(where(loose)) > 1, "tasks without a sticky key spread"

    # The home of customer-1 stops: its tasks go elsewhere, and keep to their new home.
    gone = homes["customer-1"]
    await workers[gone].stop()
    await eventually(
        lambda: (
            sum(w.ready for w in scheduler.pool if w.worker_id != gone) == 2
            and not any(w.worker_id == gone and w.ready for w in scheduler.pool)
        )
    )
    moved = await client.submit_many([TaskSpec("work", b"", sticky_key="customer-1") for _ in range(12)])
    await results_of(client, moved, 30)
    (new_home,) = where(moved)
    assert new_home != gone
    print(f"(j) customer-1 moved from {gone} to {new_home}")
