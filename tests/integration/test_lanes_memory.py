"""The scheduler's memory is bounded by bytes: large tasks nobody can run yet wait in the broker, not in it."""

from __future__ import annotations

import asyncio

import aio_pika

from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2
from sluicegate_scheduler.lanes import LaneKey

from .conftest import Stack
from .helpers import Recorder, results_of

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED
MB = 1_000_000


async def test_d_two_hundred_megabytes_waiting_for_nobody_stay_out_of_the_scheduler(stack: Stack) -> None:
    scheduler = await stack.spawn_scheduler()
    dispatcher = await stack.start_dispatcher()
    client = await stack.client()
    await asyncio.sleep(1)  # settled after start
    before = scheduler.rss_kb()
    lane = LaneKey("default", "big", 0).queue_name(stack.broker.prefix)

    ids: list[str] = []
    for chunk in range(20):  # ten at a time, so the test's own memory stays small
        payload = bytes([chunk]) * MB
        ids += await client.submit_many([TaskSpec("big", payload) for _ in range(10)])
    connection = await aio_pika.connect(stack.broker.url)
    async with connection:
        channel = await connection.channel()
        for _ in range(600):
            try:
                queue = await channel.declare_queue(lane, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
            else:
                if queue.declaration_result.message_count == 200:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the 200 tasks were not all parked in their lane within 60 s")
    parked, peak = scheduler.rss_kb(), scheduler.rss_kb("VmHWM")
    print(
        f"\n(d) scheduler RSS {before >> 10} MiB before, {parked >> 10} MiB with 200 x 1 MB parked, peak {peak >> 10} MiB"
    )
    # What the scheduler holds at most is its intake window (64 messages) on their way to the lane, once each.
    assert peak - before < 128 << 10, "200 MB waiting for nobody went through the scheduler's memory"

    recorder = Recorder()
    address = stack.address(dispatcher)
    await stack.start_worker(dispatcher, "big", worker=recorder.worker(address, "big", ["big"], slots=4))
    results = await results_of(client, ids, 120)
    assert all(r.status == COMPLETED for r in results)
    assert sorted(recorder.first_start()) == sorted(ids)
    peak = scheduler.rss_kb("VmHWM")
    print(f"(d) peak {peak >> 10} MiB once all 200 ran")
    assert peak - before < 128 << 10
