"""Run later, retry later, or not at all, on a real broker: delays, backoff and schedule-to-start timeouts,
across scheduler restarts."""

from __future__ import annotations

import asyncio
import random
import statistics
from datetime import UTC, datetime, timedelta

from sluicegate.client import TaskSpec
from sluicegate.v1 import messages_pb2

from .conftest import Recorder, Stack, eventually, percentile, results_of

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


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
