"""Retries, dead letters, schedule-to-start timeouts and leases per key, on a real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from sluicegate import amqp
from sluicegate.errors import PermanentError
from sluicegate.reasons import Reason
from sluicegate.retry import Backoff, effective_policy
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually
from .rawbroker import broker_for, task

FAILED = messages_pb2.TASK_STATUS_FAILED
EXPIRED = messages_pb2.TASK_STATUS_EXPIRED
COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


# Retries.


async def test_a_permanent_error_is_never_retried_even_with_retries_left(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="strict")
    calls: list[str] = []

    @worker.action("strict", max_retries=5, backoff=Backoff(initial=0, max=0))
    async def strict(ctx: TaskContext) -> bytes:
        calls.append(ctx.task_id)
        raise PermanentError("this input can never work")

    await stack.start_worker(dispatcher, "strict", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()

    by_default = await client.submit("strict", b"")  # the worker's default: 5 retries
    own = await client.submit("strict", b"", max_retries=5)  # the task's own
    for task_id in (by_default, own):
        result = await client.result(task_id, timeout=15)
        assert result.status == FAILED
        assert result.attempt == 1
        assert "this input can never work" in result.error
    await asyncio.sleep(0.5)  # a retry would run within this
    assert calls == [by_default, own], "each ran once"
    assert scheduler.stats.requeued[Reason.HANDLER_FAILED.value] == 0
    assert dispatcher.stats.retries_exhausted == 0
    async with broker_for(stack) as broker:
        assert await broker.drain_dead() == [], "a permanent failure is not a dead letter"


async def test_exhausted_retries_end_failed_and_are_recorded_in_dead(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="flaky")
    calls: list[tuple[str, int]] = []

    @worker.action("flaky", max_retries=2, backoff=Backoff(initial=0.01, max=0.05, multiplier=3))
    async def flaky(ctx: TaskContext) -> bytes:
        calls.append((ctx.task_id, ctx.attempt))
        raise RuntimeError(f"flaky attempt {ctx.attempt}")

    await stack.start_worker(dispatcher, "flaky", worker=worker)
    await stack.wait_workers_known(1)
    (session,) = list(dispatcher.sessions)
    assert session.action_options["flaky"].max_retries == 2, "the per-action default reached the dispatcher"
    client = await stack.client()

    async with broker_for(stack) as broker:
        requeued = await broker.watch(broker.topology.requeue)
        task_id = await client.submit("flaky", b"")  # sets no max_retries: the worker's 2 apply
        result = await client.result(task_id, timeout=20)

        assert result.status == FAILED
        assert result.attempt == 3
        assert "flaky attempt 3" in result.error
        assert calls == [(task_id, 1), (task_id, 2), (task_id, 3)]
        assert scheduler.stats.requeued[Reason.HANDLER_FAILED.value] == 2
        await eventually(lambda: dispatcher.stats.retries_exhausted == 1)  # counted once the result is confirmed

        # Each retry carries the effective policy, stamped, so that the scheduler can wait the backoff.
        await eventually(lambda: len(requeued) == 2)
        for message in requeued:
            assert message.headers[amqp.REASON_HEADER] == Reason.HANDLER_FAILED.value
            (returned,) = messages_pb2.AssignmentBatch.FromString(message.body).assignments
            assert returned.task.HasField("max_retries")
            assert returned.task.HasField("backoff")
            policy = effective_policy(returned.task, None)
            assert (policy.max_retries, policy.initial, policy.max, policy.multiplier) == (2, 0.01, 0.05, 3.0)

        (dead_message,) = await broker.drain_dead()
        assert dead_message.headers[amqp.REASON_HEADER] == Reason.RETRIES_EXHAUSTED.value
        (dead,) = messages_pb2.DeadLetterBatch.FromString(dead_message.body).dead
        assert dead.task.task_id == task_id
        assert [r.reason for r in dead.reasons] == ["handler_failed", "handler_failed", "retries_exhausted"]
        assert dead.reasons[-1].attempt == 3
        assert dead.reasons[-1].worker_id == "flaky"
        assert "flaky attempt 3" in dead.reasons[-1].detail

        # The task's own max_retries wins over the worker's default, and 0 retries is exhausted at once.
        none_left = await client.submit("flaky", b"", max_retries=0)
        result = await client.result(none_left, timeout=10)
        assert (result.status, result.attempt) == (FAILED, 1)
        (dead_message,) = await broker.drain_dead()
        (dead,) = messages_pb2.DeadLetterBatch.FromString(dead_message.body).dead
        assert dead.task.task_id == none_left
        assert [r.reason for r in dead.reasons] == ["retries_exhausted"]
    assert dispatcher.sessions.leases == 0


# Schedule-to-start timeouts.


async def test_an_assignment_that_arrives_after_the_deadline_is_never_sent(stack: Stack) -> None:
    dispatcher = await stack.start_dispatcher()
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=4, worker_id="w")
    ran: list[str] = []

    @worker.action("note")
    async def note(ctx: TaskContext) -> bytes:
        ran.append(ctx.task_id)
        return b"ran"

    await stack.start_worker(dispatcher, "w", worker=worker)
    await eventually(lambda: any(s.ready for s in dispatcher.sessions))
    (session,) = list(dispatcher.sessions)
    client = await stack.client()

    # Submitted 5 s ago with 1 s to start: the assignment (as a slow scheduler would send it) is late.
    late = task("note", client.client_id, schedule_timeout_ms=1000)
    late.submitted_at_ms -= 5000
    timely = task("note", client.client_id, schedule_timeout_ms=60_000)
    async with broker_for(stack) as broker:
        await broker.assign(
            dispatcher.id,
            *(
                messages_pb2.Assignment(task=t, attempt=1, worker_id="w", session_id=session.session_id)
                for t in (late, timely)
            ),
        )
        expired = await client.result(late.task_id, timeout=10)
        completed = await client.result(timely.task_id, timeout=10)

    assert expired.status == EXPIRED
    assert expired.error == "not started within 1000 ms of submission"
    assert completed.status == COMPLETED, "the other assignment of the same message runs"
    assert ran == [timely.task_id], "the late one never reached the worker"
    assert worker.stats.received == 1
    await eventually(lambda: dispatcher.stats.expired == 1)  # counted once the result is confirmed
    assert dispatcher.stats.forwarded == 1
    await eventually(lambda: dispatcher.sessions.leases == 0)


async def test_a_receipt_after_the_deadline_is_stale_and_the_task_expires(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(ack_timeout="20s")  # the receipt deadline is not what catches it
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=4, worker_id="slow-reader")
    ran: list[str] = []

    @worker.action("note")
    async def note(ctx: TaskContext) -> bytes:
        ran.append(ctx.task_id)
        return b"ran"

    await stack.start_worker(dispatcher, "slow-reader", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()

    worker.stop_reading()  # the assignment reaches it in time; its receipt does not
    doomed = task("note", client.client_id, schedule_timeout_ms=800)
    async with broker_for(stack) as broker:
        await broker.submit(doomed)
        await eventually(lambda: dispatcher.stats.forwarded == 1)
        assert dispatcher.sessions.leases == 1
        await asyncio.sleep(max(0.0, (doomed.submitted_at_ms + 1000 - now_ms()) / 1000))
        worker.resume_reading()
        result = await client.result(doomed.task_id, timeout=10)

        assert result.status == EXPIRED
        assert result.error == "not started within 800 ms of submission"
        await eventually(lambda: worker.stats.stale == 1)
        assert ran == [], "the worker dropped it: the handler never ran"
        await eventually(lambda: dispatcher.stats.expired == 1 and dispatcher.sessions.leases == 0)

        # Within its deadline the same path runs normally.
        fine = task("note", client.client_id, schedule_timeout_ms=30_000)
        await broker.submit(fine)
        assert (await client.result(fine.task_id, timeout=10)).status == COMPLETED
    assert ran == [fine.task_id]


# Leases per concurrency key.


async def test_state_snapshots_count_leases_per_concurrency_key(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=8, worker_id="holder")
    release = asyncio.Event()
    running: list[str] = []

    @worker.action("hold")
    async def hold(ctx: TaskContext) -> bytes:
        running.append(ctx.task_id)
        await release.wait()
        return b""

    await stack.start_worker(dispatcher, "holder", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()

    async with broker_for(stack) as broker:
        snapshots = await broker.watch(broker.topology.events, broker.topology.state_key(dispatcher.id))

        def latest() -> dict[tuple[str, str, str], int]:
            state = messages_pb2.DispatcherState.FromString(snapshots[-1].body)
            return {(k.tenant, k.action, k.key): k.count for k in state.key_leases}

        tasks = [task("hold", client.client_id, concurrency_key="customer-1") for _ in range(3)]
        tasks += [task("hold", client.client_id, concurrency_key="customer-2"), task("hold", client.client_id)]
        other = task("hold", client.client_id, concurrency_key="customer-1")
        other.tenant = "globex"  # nobody serves it here: never leased
        await broker.submit(*tasks, other)
        await eventually(lambda: len(running) == 5)
        want = {("default", "hold", "customer-1"): 3, ("default", "hold", "customer-2"): 1}
        await eventually(lambda: bool(snapshots) and latest() == want)

        release.set()
        results = await asyncio.gather(*(client.result(t.task_id, timeout=10) for t in tasks))
        assert all(r.status == COMPLETED for r in results)
        await eventually(lambda: latest() == {}, timeout=5)


# Labels from the command line.


async def test_labels_given_on_the_command_line_reach_the_dispatcher(stack: Stack) -> None:
    dispatcher = await stack.start_dispatcher()
    env = {**os.environ, "SLUICEGATE_WORKER_LABELS": "zone=ignored"}
    args = ["worker", "--dispatchers", f"127.0.0.1:{dispatcher.port}", "--worker-id", "cli-worker"]
    args += ["--label", "gpu=a100", "--label", "pool=batch,spot"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluicegate", *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await eventually(lambda: any(s.worker_id == "cli-worker" for s in dispatcher.sessions), timeout=20)
        (session,) = [s for s in dispatcher.sessions if s.worker_id == "cli-worker"]
        assert session.labels == {"gpu": "a100", "pool": "batch,spot"}, "the flags replace the variable"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
