"""The dispatch path end to end on a real broker: exactly-once completion, waiting, dead letters."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika

from sluicegate.attempts import Attempts
from sluicegate.client import TaskSpec
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


async def _echo(ctx: TaskContext) -> bytes:
    return ctx.payload


async def test_thousand_tasks_over_five_workers_complete_exactly_once(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    workers = [await stack.start_worker(dispatcher, f"w{i}", slots=8) for i in range(5)]
    await stack.wait_workers_known(5)
    client = await stack.client()

    specs = [TaskSpec("echo", f"payload-{i}".encode()) for i in range(1000)]
    ids = await client.submit_many(specs)
    results = await asyncio.wait_for(asyncio.gather(*(client.result(i) for i in ids)), 90)

    assert len({r.task_id for r in results}) == 1000
    assert all(r.status == COMPLETED for r in results)
    assert [r.output for r in results] == [s.payload for s in specs]
    await asyncio.sleep(0.3)  # a duplicate would arrive within this
    assert client.duplicates == 0
    assert sum(w.stats.completed for w in workers) == 1000
    assert all(w.stats.completed > 0 for w in workers), "load is spread over every worker"
    assert scheduler.stats.assigned == 1000
    assert dispatcher.stats.completed == 1000
    assert dispatcher.sessions.leases == 0


async def test_task_waits_for_a_worker_that_serves_its_action(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "echoer")
    await stack.wait_workers_known(1)
    client = await stack.client()

    task_id = await client.submit("shout", b"hello")
    await eventually(lambda: scheduler.waiting == 1)
    await asyncio.sleep(0.5)
    assert task_id not in client.results
    assert scheduler.stats.assigned == 0, "nothing is assigned to a worker that cannot run it"

    late = Worker(f"127.0.0.1:{dispatcher.port}", slots=1, worker_id="shouter")

    @late.action("shout")
    async def shout(ctx: TaskContext) -> bytes:
        return ctx.payload.upper()

    await stack.start_worker(dispatcher, "shouter", worker=late)
    result = await client.result(task_id, timeout=10)
    assert result.status == COMPLETED
    assert result.output == b"HELLO"
    assert result.worker_id == "shouter"


class NeverAcknowledges(Attempts):
    """Reads its stream and stays connected, but never acknowledges an assignment."""

    def accept(self, assignment: messages_pb2.Assignment, reporter: Any) -> None:
        self.stats.received += 1


async def test_undeliverable_task_ends_in_dead_with_every_reason(stack: Stack) -> None:
    scheduler = await stack.start_scheduler(max_dispatch_attempts=3)
    dispatcher = await stack.start_dispatcher(ack_timeout="300ms")
    deaf = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="deaf")
    deaf.attempts = NeverAcknowledges(deaf.worker_id, deaf.settings, deaf.stats)
    deaf.register("echo", _echo)
    await stack.start_worker(dispatcher, "deaf", worker=deaf)  # every attempt times out unacknowledged
    await stack.wait_workers_known(1)
    client = await stack.client()

    task_id = await client.submit("echo", b"never")
    result = await client.result(task_id, timeout=30)

    assert result.status == messages_pb2.TASK_STATUS_DEAD
    # The first attempt times out unacknowledged; the stream is then ended, so later attempts may
    # also find the worker not connected. Every one of them is a dispatch failure, and all are kept.
    assert result.history[0].reason == Reason.ACK_TIMEOUT.value
    assert all(Reason(r.reason).counts_as_dispatch_failure for r in result.history)
    assert [r.attempt for r in result.history] == [1, 2, 3]
    assert all(r.worker_id == "deaf" for r in result.history)
    assert scheduler.stats.dead == 1
    # The dead queue holds the task with its reasons, for operators.
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(scheduler.topology.dead, ensure=False)
        message = await queue.get(timeout=5)
        assert message is not None
        dead = messages_pb2.DeadLetterBatch.FromString(message.body).dead[0]
        await message.ack()
    assert dead.task.task_id == task_id
    assert len(dead.reasons) == 3


async def test_handler_failure_is_retried_then_reported_failed(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)
    client = await stack.client()

    result = await client.result(await client.submit("fail", None, max_retries=2), timeout=15)

    assert result.status == messages_pb2.TASK_STATUS_FAILED
    assert "failed on purpose" in result.error
    assert result.attempt == 3
    assert scheduler.stats.requeued[Reason.HANDLER_FAILED.value] == 2
    assert scheduler.stats.dead == 0


async def test_large_outputs_are_reported_in_requests_that_fit_and_oversized_ones_fail_clearly(stack: Stack) -> None:
    from sluicegate.worker import WorkerSettings

    await stack.start_scheduler()
    limit = 64 * 1024
    dispatcher = await stack.start_dispatcher(max_payload_bytes=limit)
    worker = Worker(
        f"127.0.0.1:{dispatcher.port}",
        worker_id="bulky",
        settings=WorkerSettings(slots=32, max_payload_bytes=limit),
    )

    @worker.action("grow")
    async def grow(ctx: TaskContext) -> bytes:
        return bytes(int(ctx.payload))

    await stack.start_worker(dispatcher, "bulky", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()

    # 64 outputs of 60 KiB finish together: their reports need many requests under the 64 KiB limit.
    ids = await client.submit_many([TaskSpec("grow", str(60 * 1024)) for _ in range(64)])
    too_big = await client.submit("grow", str(limit + 1))
    results = await asyncio.wait_for(asyncio.gather(*(client.result(i) for i in ids)), 30)
    assert all(r.status == COMPLETED and len(r.output) == 60 * 1024 for r in results)
    failed = await client.result(too_big, timeout=10)
    assert failed.status == messages_pb2.TASK_STATUS_FAILED
    assert f"output is {limit + 1} bytes; the limit is {limit}" in failed.error
    assert dispatcher.stats.requeued == {}, "nothing timed out waiting for a receipt"


async def test_a_copy_of_an_assignment_is_counted_as_consumed_so_the_schedulers_view_frees_the_slot(
    stack: Stack,
) -> None:
    """A scheduler that lost a confirm (or took over from one killed before acking) publishes an
    assignment again. The dispatcher settles the copy at once; it must still count it as consumed for
    the session, or the scheduler, which counted the publish, sees it in transit and the slot full forever."""
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(worker_prefetch=0)  # a free slot is a free slot on the worker
    release = asyncio.Event()
    ran: list[str] = []
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=1, worker_id="one")

    @worker.action("hold")
    async def hold(ctx: TaskContext) -> bytes:
        ran.append(ctx.task_id)
        await release.wait()
        return b""

    await stack.start_worker(dispatcher, "one", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()
    task_id = await client.submit("hold", b"")
    await eventually(lambda: ran == [task_id])
    (view,) = list(scheduler.pool)
    await eventually(lambda: view.free == 0)  # once the dispatcher's state after the lease has come

    # The same attempt published again, as the scheduler that placed it twice counted it.
    (session,) = list(dispatcher.sessions)
    (lease,) = list(session.leases.values())
    copy = messages_pb2.Assignment()
    copy.CopyFrom(lease.payload)
    connection = await aio_pika.connect(stack.broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(scheduler.topology.assign, ensure=False)
        body = messages_pb2.AssignmentBatch(assignments=[copy]).SerializeToString()
        scheduler.pool.assigned(view)
        await exchange.publish(aio_pika.Message(body), routing_key=dispatcher.id)
        await eventually(lambda: dispatcher.stats.redeliveries == 1)
        release.set()
        assert (await client.result(task_id, timeout=10)).status == COMPLETED
        # After the task ends, another copy (of an attempt already settled) is consumed and counted too.
        scheduler.pool.assigned(next(iter(scheduler.pool)))
        await exchange.publish(aio_pika.Message(body), routing_key=dispatcher.id)
        await eventually(lambda: dispatcher.stats.redeliveries == 2)

    await eventually(lambda: session.received == 3)
    await eventually(lambda: [w.free for w in scheduler.pool] == [1], timeout=5)
    assert ran == [task_id], "the copies never ran"
    second = await client.submit("hold", b"")
    assert (await client.result(second, timeout=10)).status == COMPLETED, "the slot came back"
