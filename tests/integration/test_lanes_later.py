"""Run later, retry later, or not at all, on a real broker: delays, backoff and schedule-to-start timeouts,
across scheduler restarts."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest

from sluicegate.client import TaskSpec
from sluicegate.retry import Backoff, RetryPolicy
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually
from .helpers import Recorder, percentile, results_of
from .rawbroker import broker_for

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED
EXPIRED = messages_pb2.TASK_STATUS_EXPIRED


def lateness(recorder: Recorder, results: list[messages_pb2.TaskResult], delays: dict[str, float]) -> list[int]:
    """How long after its time each task started, in ms (negative: early). A delay counts from the task's
    submission stamp, as the client computes run_at; a run_at in `delays` is given as a negative unix time."""
    first = recorder.first_start()
    late = []
    for result in results:
        wait = delays[result.task_id]
        due = round(-wait * 1000) if wait < 0 else result.submitted_at_ms + round(wait * 1000)
        late.append(first[result.task_id].at_ms - due)
    return late


async def test_f_delayed_tasks_never_start_early_and_survive_a_scheduler_restart(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    recorder = Recorder()
    await stack.start_worker(dispatcher, "w", worker=recorder.worker(stack.address(dispatcher), "w", slots=32))
    await stack.wait_workers_known(1)
    client = await stack.client()

    # Delays from 0.3 to 4 s, and a few with run_at instead.
    rng = random.Random(9)
    delays = [round(rng.uniform(0.3, 4.0), 3) for _ in range(100)]
    ids = await client.submit_many([TaskSpec("work", b"", delay=d) for d in delays])
    waits = dict(zip(ids, delays, strict=True))
    for seconds in (1.0, 2.0, 3.0):
        at = datetime.now(UTC) + timedelta(seconds=seconds)
        waits[await client.submit("work", b"", run_at=at)] = -at.timestamp()
    await eventually(lambda: scheduler.core.delayed > 50, timeout=5)  # on the ladder, not held
    results = await results_of(client, list(waits), 30)
    assert all(r.status == COMPLETED for r in results)
    late = lateness(recorder, results, waits)
    print(f"\n(f) {len(late)} delayed tasks started late by p50 {statistics.median(late):.0f} ms, "
          f"p99 {percentile(late, 99):.0f} ms, max {max(late)} ms (min {min(late)} ms)")  # fmt: skip
    assert min(late) >= 0, "a delayed task started before its time"
    assert percentile(late, 99) < 1000

    # Restart while they wait: the ladder is in the broker, the new scheduler neither loses nor hurries them.
    recorder.starts.clear()
    delays = [d for d in (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0) for _ in range(5)]
    ids = await client.submit_many([TaskSpec("work", b"", delay=d) for d in delays])
    waits = dict(zip(ids, delays, strict=True))
    await eventually(lambda: scheduler.core.delayed == len(ids), timeout=5)
    await scheduler.close()
    await asyncio.sleep(1.0)  # no scheduler at all for a while
    scheduler = await stack.start_scheduler()
    await eventually(lambda: scheduler.leading.is_set(), timeout=10)
    results = await results_of(client, ids, 30)
    assert all(r.status == COMPLETED for r in results)
    late = lateness(recorder, results, waits)
    print(
        f"(f) across a restart: late by p50 {statistics.median(late):.0f} ms, max {max(late)} ms (min {min(late)} ms)"
    )
    assert min(late) >= 0, "a delayed task started before its time after the restart"
    assert max(late) < 1500
    assert len(recorder.starts) == len(ids), "each ran once"


class Flaky:
    """A handler failing each task's first `failures` attempts; notes when each attempt started and failed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.started: dict[tuple[str, int], int] = {}
        self.failed: dict[tuple[str, int], int] = {}

    async def __call__(self, ctx: TaskContext) -> bytes:
        self.started[(ctx.task_id, ctx.attempt)] = now_ms()
        if ctx.attempt <= self.failures:
            self.failed[(ctx.task_id, ctx.attempt)] = now_ms()
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        return b"ok"

    def gaps(self, task_id: str) -> list[int]:
        """From each failure to the next attempt's start, in ms."""
        return [
            self.started[(task_id, attempt + 1)] - self.failed[(task_id, attempt)]
            for attempt in range(1, self.failures + 1)
            if (task_id, attempt + 1) in self.started
        ]


async def test_g_retries_wait_their_backoff_and_a_restart_does_not_hurry_them(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    flaky = Flaky(failures=3)
    worker = Worker(stack.address(dispatcher), slots=8, worker_id="flaky")
    worker.register("own", flaky)  # tasks bring their own policy
    worker.register("default", flaky, max_retries=3, backoff=Backoff(initial=0.3, max=0.3, jitter=False))
    await stack.start_worker(dispatcher, "flaky", worker=worker)
    await stack.wait_workers_known(1)
    client = await stack.client()

    policy = RetryPolicy(max_retries=3, initial=0.4, max=1.0, multiplier=2.0, jitter=False)
    own = await client.submit_many([TaskSpec("own", b"", retry=policy) for _ in range(4)])
    by_default = await client.submit_many([TaskSpec("default", b"") for _ in range(4)])
    results = await results_of(client, own + by_default, 30)
    assert [(r.status, r.attempt) for r in results] == [(COMPLETED, 4)] * 8
    for ids, waits in ((own, [400, 800, 1000]), (by_default, [300, 300, 300])):
        for task_id in ids:
            gaps = flaky.gaps(task_id)
            print(f"\n(g) waits {waits} ms: failure to next attempt {gaps} ms", end="")
            assert all(wait <= gap < wait + 1000 for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)

    # A 4 s backoff with a scheduler restart in the middle: not lost, not hurried.
    slow = RetryPolicy(max_retries=1, initial=4.0, max=4.0, jitter=False)
    flaky.failures = 1
    task_id = await client.submit("own", b"", retry=slow)
    await eventually(lambda: (task_id, 1) in flaky.failed, timeout=10)
    await eventually(lambda: scheduler.core.delayed == 1, timeout=5)  # on the ladder, not in memory
    await asyncio.sleep(1.0)
    await scheduler.close()
    await asyncio.sleep(0.5)
    scheduler = await stack.start_scheduler()
    result = await client.result(task_id, timeout=20)
    assert (result.status, result.attempt) == (COMPLETED, 2)
    (gap,) = flaky.gaps(task_id)
    print(f"\n(g) a 4000 ms backoff across a scheduler restart: failure to retry {gap} ms")
    assert 4000 <= gap < 5500


async def test_h_a_task_not_started_in_time_expires_at_the_scheduler_and_never_runs(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(worker_prefetch=0)  # nothing queues at the dispatcher
    recorder = Recorder()
    recorder.gate.clear()  # whatever starts holds its slot until the gate opens
    await stack.start_worker(dispatcher, "busy", worker=recorder.worker(stack.address(dispatcher), "busy", slots=1))
    await stack.wait_workers_known(1)
    client = await stack.client()

    # Nobody serves its action.
    orphan = await client.submit("nobody", b"", schedule_timeout=1.0)
    # Its action's only slot is taken: it waits in its lane behind the running task, and one with time to spare.
    running = await client.submit("work", b"")
    await eventually(lambda: len(recorder.starts) == 1, timeout=10)
    behind = await client.submit("work", b"", schedule_timeout=1.0)
    patient = await client.submit("work", b"", schedule_timeout=60.0)

    for task_id in (orphan, behind):
        result = await client.result(task_id, timeout=10)
        assert result.status == EXPIRED
        assert "not started within 1000 ms of submission" in result.error
        assert 1000 <= result.finished_at_ms - result.submitted_at_ms < 3000
    assert scheduler.stats.expired == 2, "the scheduler expired both, not a dispatcher"

    late = recorder.worker(stack.address(dispatcher), "late", ["nobody"], slots=4)
    await stack.start_worker(dispatcher, "late", worker=late)
    recorder.gate.set()
    for task_id in (running, patient):
        assert (await client.result(task_id, timeout=10)).status == COMPLETED
    await asyncio.sleep(1.0)  # an expired task that ran anyway would start within this
    assert recorder.order() == [running, patient], "neither expired task ever ran"
    await eventually(lambda: scheduler.waiting == 0)
    assert client.duplicates == 0


async def test_h_a_task_queued_at_the_dispatcher_behind_a_busy_slot_expires_there_and_never_runs(stack: Stack) -> None:
    """With a per-worker prefetch, a task can wait in its worker's queue at the dispatcher rather than
    in its lane. Its start deadline holds there too: it must not wait for the slot for ever."""
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(worker_prefetch=1)
    recorder = Recorder()
    recorder.gate.clear()
    await stack.start_worker(dispatcher, "busy", worker=recorder.worker(stack.address(dispatcher), "busy", slots=1))
    await stack.wait_workers_known(1)
    client = await stack.client()

    running = await client.submit("work", b"")
    await eventually(lambda: len(recorder.starts) == 1, timeout=10)
    behind = await client.submit("work", b"", schedule_timeout=1.0)  # queued for the busy worker's slot
    result = await client.result(behind, timeout=10)
    assert result.status == EXPIRED
    assert "not started within 1000 ms of submission" in result.error
    assert 1000 <= result.finished_at_ms - result.submitted_at_ms < 3000
    assert (dispatcher.stats.expired, scheduler.stats.expired) == (1, 0), "the dispatcher expired it"
    recorder.gate.set()
    assert (await client.result(running, timeout=10)).status == COMPLETED
    await asyncio.sleep(0.5)
    assert recorder.order() == [running], "the expired task never ran"


async def test_a_lane_deleted_behind_the_schedulers_back_does_not_end_its_session(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A lane can be gone when a scheduler comes to read it (a scheduler that led before deleted it as
    idle). Asking the broker about it must not close the channel the session reads every lane on."""
    caplog.set_level(logging.WARNING, logger="sluicegate_scheduler")
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    client = await stack.client()
    stranded = await client.submit("later", b"")  # nobody serves it: parked in its lane
    await eventually(lambda: any(lane.key.action == "later" and lane.parked for lane in scheduler.core.book))
    (lane,) = [lane for lane in scheduler.core.book if lane.key.action == "later"]
    async with broker_for(stack) as broker:
        channel = await broker.connection.channel()
        await channel.queue_delete(lane.name)  # what it held goes with it, as a deleted queue's does

    recorder = Recorder()
    await stack.start_worker(dispatcher, "late", worker=recorder.worker(stack.address(dispatcher), "late", ["later"]))
    await stack.wait_workers_known(1)  # the scheduler now wants to read the lane
    fresh = await client.submit("later", b"")
    assert (await client.result(fresh, timeout=10)).status == COMPLETED
    assert stranded not in recorder.order()
    assert not [r for r in caplog.records if "session ended" in r.getMessage()], "the session went on"
