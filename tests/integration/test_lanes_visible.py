"""What waits, and why, is visible: lane gauges and waiting tasks by reason on /metrics, one log line per lane."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sluicegate.client import TaskSpec
from sluicegate.metrics import MetricsServer
from sluicegate.wire import now_ms

from .conftest import Stack
from .helpers import Recorder, Samples, samples, scrape

NOBODY = "wait in a lane: no connected worker serves it"


async def test_k_lanes_and_waiting_tasks_by_reason_on_metrics_and_one_warning_per_lane(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sluicegate_scheduler")
    scheduler = await stack.start_scheduler(concurrency="work:one-at-a-time=1")
    dispatcher = await stack.start_dispatcher()
    recorder = Recorder()
    recorder.gate.clear()
    await stack.start_worker(dispatcher, "w", worker=recorder.worker(stack.address(dispatcher), "w", slots=8))
    await stack.wait_workers_known(1)
    client = await stack.client()

    submitted = now_ms()
    # 70 tasks for an action nobody serves, in two tenants and several lanes of one of them.
    specs = [TaskSpec("nobody", b"", priority=p, fairness_key=k) for p in (0, 5) for k in ("a", "b") for _ in range(10)]
    specs += [TaskSpec("nobody", b"", tenant="globex") for _ in range(20)]
    await client.submit_many(specs)
    for _ in range(5):
        await client.submit_many([TaskSpec("nobody", b"") for _ in range(2)])  # more of the same, later
    # Delayed, and at their key's limit.
    await client.submit_many([TaskSpec("work", b"", delay=60) for _ in range(5)])
    await client.submit_many([TaskSpec("work", b"", concurrency_key="one-at-a-time") for _ in range(4)])

    async with MetricsServer(scheduler.metrics.registry, host="127.0.0.1", port=0, ready=lambda: True) as server:

        async def metrics() -> Samples:
            status, text = await asyncio.to_thread(scrape, server.port)
            assert status == 200
            return samples(text)

        def waiting(m: Samples, reason: str) -> float | None:
            return m.get(("sluicegate_waiting_tasks", (("reason", reason),)))

        m = await metrics()
        for _ in range(200):  # until everything found its place
            if (waiting(m, "no_worker"), waiting(m, "delayed"), waiting(m, "at_limit")) == (70, 5, 3):
                break
            await asyncio.sleep(0.1)
            m = await metrics()
        waited = (now_ms() - submitted) / 1000

    def depth(tenant: str, action: str) -> float:
        return m[("sluicegate_lane_depth", (("action", action), ("tenant", tenant)))]

    assert depth("default", "nobody") == 50
    assert depth("globex", "nobody") == 20
    oldest = m[("sluicegate_lane_oldest_seconds", (("action", "nobody"), ("tenant", "default")))]
    assert 0 < oldest <= waited + 0.5
    assert m[("sluicegate_waiting_tasks", (("reason", "no_worker"),))] == 70
    assert m[("sluicegate_waiting_tasks", (("reason", "delayed"),))] == 5
    assert m[("sluicegate_waiting_tasks", (("reason", "at_limit"),))] == 3
    assert len(recorder.starts) == 1, "one of the limited key runs"

    warnings = [r.getMessage() for r in caplog.records if NOBODY in r.getMessage()]
    assert sorted(warnings) == sorted(
        f"tasks of tenant {tenant} for action 'nobody' {NOBODY}" for tenant in ("default", "globex")
    ), "one line per lane waiting for nobody, not one per task"
    recorder.gate.set()
