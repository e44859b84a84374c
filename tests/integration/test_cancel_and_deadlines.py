"""Cancellation end to end, and run deadlines the dispatcher enforces, on a real broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate.attempts import Attempts
from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker
from sluicegate_dispatcher.app import Dispatcher

from .conftest import Stack, eventually
from .rawbroker import broker_for, task

pytestmark = pytest.mark.timeout(90)

CANCELLED = messages_pb2.TASK_STATUS_CANCELLED
COMPLETED = messages_pb2.TASK_STATUS_COMPLETED
FAILED = messages_pb2.TASK_STATUS_FAILED


class Recording:
    """A worker's handlers that note what started, what finished, and why they were cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: dict[str, str] = {}

    def worker(self, dispatcher: Dispatcher, worker_id: str, action: str = "slow", slots: int = 4) -> Worker:
        worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=slots, worker_id=worker_id)

        async def slow(ctx: TaskContext) -> bytes:
            self.started.append(ctx.task_id)
            try:
                await asyncio.sleep(float(ctx.json().get("seconds", 30)))
            except asyncio.CancelledError:
                self.cancelled[ctx.task_id] = ctx.cancel_reason
                raise
            self.finished.append(ctx.task_id)
            return b"done"

        worker.register(action, slow)
        return worker


async def test_a_waiting_task_cancelled_ends_at_once_and_never_runs(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    client = await stack.client()
    task_id = await client.submit("slow", {"seconds": 0})  # nobody serves it yet: it waits in its lane
    await eventually(lambda: stack.scheduler is not None and stack.scheduler.waiting == 1)

    result = await client.cancel(task_id, "not needed any more", timeout=10)
    assert result is not None
    assert result.status == CANCELLED
    assert "not needed any more" in result.error

    seen = Recording()
    await stack.start_worker(dispatcher, "late", worker=seen.worker(dispatcher, "late"))
    await asyncio.sleep(1.5)  # its lane is read now: the copy there is dropped, not run
    assert seen.started == []


async def test_a_running_task_is_stopped_on_its_worker_and_told_why(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    seen = Recording()
    await stack.start_worker(dispatcher, "w1", worker=seen.worker(dispatcher, "w1"))
    await stack.wait_workers_known(1)
    client = await stack.client()

    task_id = await client.submit("slow", {"seconds": 30})
    await eventually(lambda: task_id in seen.started)
    result = await client.cancel(task_id, "user pressed stop", timeout=10)

    assert result is not None
    assert result.status == CANCELLED
    await eventually(lambda: task_id in seen.cancelled)
    assert seen.cancelled[task_id] == "user pressed stop", "the handler is told why"
    assert task_id not in seen.finished
    await eventually(lambda: dispatcher.sessions.leases == 0)
    assert dispatcher.stats.cancelled == 1


async def test_cancelling_a_finished_task_answers_that_it_had_finished(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)
    client = await stack.client()
    task_id = await client.submit("echo", b"hi")
    assert (await client.result(task_id, timeout=10)).status == COMPLETED
    result = await client.cancel(task_id)
    assert result is not None
    assert result.status == COMPLETED


async def test_a_delayed_task_cancelled_never_runs_at_its_time(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    seen = Recording()
    await stack.start_worker(dispatcher, "w1", worker=seen.worker(dispatcher, "w1"))
    await stack.wait_workers_known(1)
    client = await stack.client()
    task_id = await client.submit("slow", {"seconds": 0}, delay=1.5)
    await asyncio.sleep(0.3)
    result = await client.cancel(task_id, timeout=10)
    assert result is not None
    assert result.status == CANCELLED
    await asyncio.sleep(2.0)
    assert seen.started == []


async def test_a_cancel_made_while_no_scheduler_runs_is_kept_across_its_restart(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    client = await stack.client()
    task_id = await client.submit("slow", {"seconds": 0})
    await eventually(lambda: scheduler.waiting == 1)
    await scheduler.close()  # the task stays parked in its lane; the cancel goes to the stream

    result = await client.cancel(task_id, "changed my mind", timeout=1)
    assert result is None, "no scheduler is there to answer yet"
    await stack.start_scheduler()
    seen = Recording()
    await stack.start_worker(dispatcher, "w1", worker=seen.worker(dispatcher, "w1"))
    result = await client.result(task_id, timeout=15)
    assert result.status == CANCELLED
    await asyncio.sleep(1.0)
    assert seen.started == []


async def test_a_cancel_made_while_the_dispatcher_is_down_is_kept_across_its_restart(stack: Stack) -> None:
    # No scheduler runs: only the dispatcher's own memory of the cancellation can stop the task.
    dispatcher = await stack.start_dispatcher(id="d-restart")
    client = await stack.client()
    await dispatcher.close()
    doomed = task("slow", client.client_id, payload=b"{}")
    assignment = messages_pb2.Assignment(
        task=doomed, attempt=1, worker_id="w1", session_id="s1", dispatcher_id="d-restart", assigned_at_ms=now_ms()
    )
    async with broker_for(stack) as broker:
        # In the stopped dispatcher's inbox, as a scheduler placed it just before the outage.
        await broker.assign("d-restart", assignment)
    assert await client.cancel(doomed.task_id, "cancelled during an outage", timeout=0.5) is None

    again = await stack.start_dispatcher(id="d-restart")
    seen = Recording()
    await stack.start_worker(again, "w1", worker=seen.worker(again, "w1"))
    result = await client.result(doomed.task_id, timeout=20)
    assert result.status == CANCELLED
    assert "cancelled during an outage" in result.error
    assert again.stats.cancelled == 1
    await asyncio.sleep(0.5)
    assert seen.started == []


class NeverAnswers(Attempts):
    """Acknowledges its assignments and then never reports on them: a hung or hostile worker."""

    async def _run_handler(self, assignment: Any, reporter: Any, final: Any) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not self._stops:
                    raise  # only the worker's own stop ends it
                self._stops.clear()  # told to stop this attempt: ignored


async def test_the_dispatcher_fails_a_run_past_its_deadline_whatever_the_worker_does(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(run_grace="500ms")
    hung = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="hung")
    hung.attempts = NeverAnswers(hung.worker_id, hung.settings, hung.stats)
    hung.register("slow", _never)
    await stack.start_worker(dispatcher, "hung", worker=hung)
    await stack.wait_workers_known(1)
    client = await stack.client()

    task_id = await client.submit("slow", {}, timeout_s=1, max_retries=0)
    result = await client.result(task_id, timeout=20)
    assert result.status == FAILED
    assert "timed out" in result.error
    assert dispatcher.stats.timed_out == 1
    await eventually(lambda: dispatcher.sessions.leases == 0)


async def test_a_handler_that_extends_its_deadline_is_not_timed_out(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(run_grace="200ms")
    worker = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="patient")

    async def long(ctx: TaskContext) -> bytes:
        for _ in range(6):
            assert await ctx.extend(1.0)
            await asyncio.sleep(0.4)
        return b"finished"

    worker.register("long", long)
    await stack.start_worker(dispatcher, "patient", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()
    task_id = await client.submit("long", {}, timeout_s=1, max_retries=0)  # runs 2.4 s on a 1 s timeout
    result = await client.result(task_id, timeout=20)
    assert result.status == COMPLETED, result.error
    assert dispatcher.stats.timed_out == 0


async def _never(ctx: TaskContext) -> bytes:
    raise AssertionError("not called")


async def test_submit_many_then_cancel_some_only_those_never_finish(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    seen = Recording()
    await stack.start_worker(dispatcher, "w1", worker=seen.worker(dispatcher, "w1", slots=2))
    await stack.wait_workers_known(1)
    client = await stack.client()
    ids = await client.submit_many([TaskSpec("slow", {"seconds": 0.2}) for _ in range(12)])
    doomed = ids[6:]
    results = await asyncio.gather(*(client.cancel(t, timeout=20) for t in doomed))
    statuses = {r.status for r in results if r is not None}
    assert statuses <= {CANCELLED, COMPLETED}
    rest = [await client.result(t, timeout=20) for t in ids[:6]]
    assert all(r.status == COMPLETED for r in rest)
    cancelled = {t for t, r in zip(doomed, results, strict=True) if r is not None and r.status == CANCELLED}
    assert cancelled, "most of those cancelled while they waited"
    assert not cancelled & set(seen.finished), "a task that ended cancelled never finished on a worker"
