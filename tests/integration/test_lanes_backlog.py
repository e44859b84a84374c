"""No head-of-line blocking, on a real broker: backlogs of one action, tenant or key delay nobody else."""

from __future__ import annotations

import asyncio
import statistics
import time

from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

from .conftest import Stack, eventually
from .helpers import Recorder, flood, percentile, results_of, submit_steadily

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


async def fifo_wait_ms(recorder: Recorder, count: int, since_ms: int) -> int:
    """How long a task submitted at `since_ms` behind the backlog would have waited in one FIFO queue:
    until the backlog's last task started. Waits of its own lane are asserted as a fraction of this,
    which this shared machine's speed scales alike."""
    await eventually(lambda: len(recorder.first_start()) >= count, timeout=120)
    return max(s.at_ms for s in recorder.first_start().values()) - since_ms


def summary(waits: list[int]) -> str:
    return f"p50 {statistics.median(waits):.0f} ms, p99 {percentile(waits, 99):.0f} ms, max {max(waits)} ms"


async def serving(stack: Stack, recorder: Recorder, workers: int = 2, slots: int = 16) -> Stack:
    """A scheduler, a dispatcher and `workers` workers of the action `work` that record what they run."""
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    for index in range(workers):
        name = f"w{index}"
        await stack.start_worker(dispatcher, name, worker=recorder.worker(stack.address(dispatcher), name, slots=slots))
    await stack.wait_workers_known(workers)
    return stack


async def test_a_backlog_for_an_action_nobody_serves_delays_nobody(stack: Stack, twin: Stack) -> None:
    """Two identical stacks side by side, so that both runs see the same machine: one has 5,000 tasks
    waiting for an action nobody serves. Both then take 500 tasks at the same steady rate."""
    alone, loaded = Recorder(), Recorder()
    await serving(twin, alone)
    await serving(stack, loaded)
    scheduler, (dispatcher,) = stack.scheduler, stack.dispatchers
    assert scheduler is not None
    clients = (await twin.client(), await stack.client())
    rate = 50.0

    started = time.monotonic()
    backlog = await clients[1].submit_many([TaskSpec("nobody", b"") for _ in range(5000)], batch_size=1)
    await eventually(lambda: scheduler.waiting == 5000, timeout=30)
    parked_in = time.monotonic() - started
    runs = await asyncio.gather(
        *(submit_steadily(client, [TaskSpec("work", b"") for _ in range(500)], rate) for client in clients)
    )
    baseline = alone.waits_ms(await results_of(clients[0], runs[0], 60))
    behind = loaded.waits_ms(await results_of(clients[1], runs[1], 60))
    print(f"\n(a) 500 tasks at {rate:.0f}/s, nothing else waiting: {summary(baseline)}")
    print(f"(a) 500 tasks at {rate:.0f}/s, 5,000 waiting for nobody (parked in {parked_in:.1f} s): {summary(behind)}")
    assert not set(backlog) & set(loaded.first_start()), "nothing ran the 5,000"
    assert scheduler.waiting == 5000
    # Within 2x; below 25 ms a single pause of this shared machine would count double, hence the floor.
    assert percentile(behind, 99) <= 2 * max(percentile(baseline, 99), 25)

    # A worker for their action registers: every one of the 5,000 runs, once.
    started = time.monotonic()
    late = loaded.worker(stack.address(dispatcher), "late", ["nobody"], slots=64)
    await stack.start_worker(dispatcher, "late", worker=late)
    results = await results_of(clients[1], backlog, 90)
    print(f"(a) the 5,000 ran in {time.monotonic() - started:.1f} s once a worker for them registered")
    assert all(r.status == COMPLETED for r in results)
    ran = [s.task_id for s in loaded.starts if s.worker_id == "late"]
    assert sorted(ran) == sorted(backlog), "each of the 5,000 ran exactly once"
    await eventually(lambda: scheduler.waiting == 0)


async def test_b_a_tenant_flooding_one_task_per_message_delays_no_other_tenant(stack: Stack) -> None:
    """The flood comes from a producer process of its own, faster than the scheduler (a process of its
    own too) reads it, so that most of it still waits in the broker when the other tenant submits."""
    scheduler = await stack.spawn_scheduler()
    dispatcher = await stack.start_dispatcher()
    address = stack.address(dispatcher)
    flooder, other = Recorder(hold=0.005), Recorder()
    for tenant, recorder in (("acme", flooder), ("globex", other)):
        for index in range(2):
            name = f"{tenant}-{index}"
            await stack.start_worker(dispatcher, name, worker=recorder.worker(address, name, slots=16, tenant=tenant))
    await scheduler.wait_workers_known(4)
    client = await stack.client()

    submitted_in = await flood(stack.broker, 10_000, "acme")
    submitted_at = now_ms()
    ids = await client.submit_many([TaskSpec("work", b"", tenant="globex") for _ in range(100)], batch_size=1)
    waits = other.waits_ms(await results_of(client, ids, 60))
    done = len(flooder.first_start())
    fifo = await fifo_wait_ms(flooder, 10_000, submitted_at)
    print(f"\n(b) 10,000 of tenant acme submitted in {submitted_in:.1f} s; 100 of globex just after: {summary(waits)}")
    print(f"(b) acme had run {done} of its 10,000 when globex's last started; behind them all: {fifo} ms")
    assert done < 10_000, "acme still had a backlog when globex's tasks ran"
    assert percentile(waits, 99) < fifo / 2, "globex waited for much of acme's backlog"


async def test_c_a_key_flooding_its_tenant_delays_no_other_key_and_keys_share_by_weight(stack: Stack) -> None:
    """One tenant's intake is first in, first out: the other key's tasks wait until the scheduler has
    read the burst ahead of them into its key's lane, and no longer."""
    await stack.start_scheduler(fairness_weights="heavy=3")
    dispatcher = await stack.start_dispatcher()
    address = stack.address(dispatcher)
    recorder = Recorder(hold=0.005)
    for name in ("w1", "w2"):
        await stack.start_worker(dispatcher, name, worker=recorder.worker(address, name, slots=16))
    await stack.wait_workers_known(2)
    client = await stack.client()

    burst = await client.submit_many([TaskSpec("work", b"k1", fairness_key="k1") for _ in range(10_000)])
    submitted_at = now_ms()
    ids = await client.submit_many([TaskSpec("work", b"k2", fairness_key="k2") for _ in range(100)])
    waits = recorder.waits_ms(await results_of(client, ids, 60))
    done = len(set(burst) & set(recorder.first_start()))
    fifo = await fifo_wait_ms(recorder, 10_100, submitted_at)
    print(f"\n(c) 10,000 of key k1, then 100 of key k2 just after: k2 {summary(waits)}; k1 had run {done} by then")
    print(f"(c) behind all of k1's: {fifo} ms")
    assert done < 10_000, "k1 still had a backlog when k2's tasks ran"
    assert percentile(waits, 99) < fifo / 2, "k2 waited for much of k1's backlog"

    # Weights: with both keys backlogged, "heavy" (weight 3) gets three slots for each of "light"'s.
    recorder.starts.clear()
    await client.submit_many(
        [TaskSpec("work", b"heavy", fairness_key="heavy") for _ in range(3000)]
        + [TaskSpec("work", b"light", fairness_key="light") for _ in range(3000)]
    )
    await eventually(lambda: sum(s.group == "light" for s in recorder.starts) >= 300, timeout=60)
    both = [s.group for s in recorder.starts if s.group in ("heavy", "light")]
    # From light's first start (before it, light's tasks had not reached the scheduler yet: only heavy
    # was backlogged) to its last.
    first_light = both.index("light")
    last_light = max(i for i, g in enumerate(both) if g == "light")
    window = both[first_light : last_light + 1]
    heavy, light = window.count("heavy"), window.count("light")
    print(
        f"(c) with heavy=3, both backlogged: heavy {heavy}, light {light}, ratio {heavy / light:.2f} "
        f"(heavy alone before light's first start: {first_light})"
    )
    assert 2.5 <= heavy / light <= 3.5
