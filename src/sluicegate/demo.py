"""The demo: a scheduler, a dispatcher and several workers on a real broker, one of them going deaf."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta

from sluicegate import amqp
from sluicegate.cli import demo_worker
from sluicegate.client import Client, TaskSpec
from sluicegate.errors import InvalidInput
from sluicegate.report import Progress, percentile, status_name
from sluicegate.settings import BrokerSettings
from sluicegate.worker import Worker
from sluicegate_dispatcher.app import Dispatcher
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.app import Scheduler
from sluicegate_scheduler.settings import SchedulerSettings

STALL_AFTER = 10  # assignments the deaf worker reads before it stops reading its stream


async def _stall_when_busy(worker: Worker) -> None:
    while worker.stats.received < STALL_AFTER:  # noqa: ASYNC110 - a counter, polled briefly
        await asyncio.sleep(0.01)
    worker.stop_reading()


async def run_demo(
    broker: BrokerSettings, *, workers: int, tasks: int, payload_bytes: int, stall: bool, rate: int = 300
) -> int:
    """Push `tasks` tasks through; print what happened. Returns 0 when every task has a result."""
    if not 2 <= workers <= 64 or not 1 <= tasks <= 200_000 or not 0 <= payload_bytes <= 512 * 1024:
        raise InvalidInput("demo takes 2-64 workers, 1-200000 tasks and payloads up to 512 KiB")
    if not 1 <= rate <= 100_000:
        raise InvalidInput("demo --rate must be between 1 and 100000 tasks a second")
    broker = broker.model_copy(update={"prefix": f"{broker.prefix}-demo-{uuid.uuid4().hex[:8]}"})
    dispatcher_settings = DispatcherSettings(
        listen="127.0.0.1:0", ack_timeout=timedelta(seconds=3), drain_grace=timedelta(seconds=1)
    )
    dispatcher = Dispatcher(dispatcher_settings, broker)
    try:
        async with Scheduler(SchedulerSettings(), broker) as scheduler, dispatcher:
            code = await _run_fleet(broker, tasks, payload_bytes, stall, workers, scheduler, dispatcher, rate)
    finally:
        await _clean(broker, dispatcher.id)
    return code


async def _run_fleet(
    broker: BrokerSettings,
    tasks: int,
    payload_bytes: int,
    stall: bool,
    workers: int,
    scheduler: Scheduler,
    dispatcher: Dispatcher,
    rate: int,
) -> int:
    address = f"127.0.0.1:{dispatcher.port}"
    fleet = [demo_worker(address, 16, f"worker-{i + 1}") for i in range(workers - 1)]
    deaf = demo_worker(address, 16, "worker-deaf")
    fleet.append(deaf)
    async with contextlib.AsyncExitStack() as stack:
        for worker in fleet:
            await stack.enter_async_context(worker)
        await asyncio.wait_for(asyncio.gather(*(w.registered.wait() for w in fleet)), 30)
        if stall:
            stack.push_async_callback(_cancel, asyncio.create_task(_stall_when_busy(deaf)))
        what = f"worker-deaf stops reading its stream after {STALL_AFTER} tasks" if stall else "no stall"
        print(f"Sluicegate demo: {tasks} tasks at {rate}/s over {workers} workers on {broker.prefix}; {what}")
        return await _push(broker, tasks, payload_bytes, scheduler, dispatcher, fleet, rate)


async def _push(
    broker: BrokerSettings,
    tasks: int,
    payload_bytes: int,
    scheduler: Scheduler,
    dispatcher: Dispatcher,
    fleet: list[Worker],
    rate: int,
) -> int:
    specs: list[TaskSpec] = []
    for i in range(tasks):
        if i % 100 == 99:
            specs.append(TaskSpec("fail", {"n": i}, max_retries=1))
        elif i % 10 == 5:
            specs.append(TaskSpec("sleep", {"seconds": 0.02}))
        else:
            specs.append(TaskSpec("echo", bytes(payload_bytes)))
    for spec in specs:
        spec.task_id = uuid.uuid4().hex
    async with Client(broker) as client:
        started = time.monotonic()
        submitting = asyncio.create_task(_submit_steadily(client, specs, rate))
        ids = [spec.task_id for spec in specs]
        results = await Progress(len(ids), sys.stderr).collect(client, ids, timeout=300)
        await submitting
        elapsed = time.monotonic() - started
        duplicates = client.duplicates
    by_status = Counter(status_name(r.status) for r in results.values())
    latency = [r.finished_at_ms - r.submitted_at_ms for r in results.values()]
    lost = len(ids) - len(results)
    requeued = ", ".join(f"{k} {v}" for k, v in scheduler.stats.requeued.most_common()) or "none"
    per_worker = Counter(r.worker_id for r in results.values() if r.worker_id)
    print(f"completed          {by_status['completed']}")
    print(f"failed             {by_status['failed']} (the 'fail' action, after one retry each)")
    print(f"dead               {by_status['dead']}")
    print(f"lost               {lost}")
    print(f"duplicate results  {duplicates}")
    print(f"requeued           {sum(scheduler.stats.requeued.values())} ({requeued})")
    print(f"send-lock timeouts {dispatcher.stats.lock_timeouts}; streams ended {dispatcher.stats.streams_ended}")
    print(f"latency            p50 {percentile(latency, 50):.0f} ms, p99 {percentile(latency, 99):.0f} ms")
    print(f"throughput         {len(results) / elapsed:.0f} tasks/s over {elapsed:.1f} s")
    print("per worker         " + ", ".join(f"{w.worker_id} {per_worker[w.worker_id]}" for w in fleet))
    return 0 if lost == 0 else 1


async def _submit_steadily(client: Client, specs: list[TaskSpec], rate: int) -> None:
    """Submit at a steady rate, a slice every 50 ms, as a stream of producers would."""
    step = max(1, rate // 20)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, first in enumerate(range(0, len(specs), step)):
        await asyncio.sleep(max(0.0, start + index * 0.05 - loop.time()))
        await client.submit_many(specs[first : first + step])


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _clean(broker: BrokerSettings, dispatcher_id: str) -> None:
    with contextlib.suppress(Exception):
        connection = await amqp.connect(broker.rabbitmq_url.get_secret_value(), deadline=5)
        async with connection:
            await amqp.delete_topology(connection, amqp.Topology(broker.prefix), [dispatcher_id])
