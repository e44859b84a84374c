"""Limits by key and affinity on a real broker: concurrency caps hold under load and through a killed
worker, rate limits pace starts, preferred labels and sticky keys steer tasks."""

from __future__ import annotations

from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2

from .conftest import Recorder, Stack, eventually, kill_worker, results_of

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
