"""Scenario 4: one of twenty workers stops reading its stream (alive, heartbeating, deaf).

Compared with the same run without a stall: the completion rate does not drop, the other
nineteen's p99 stays within 2x, every assignment routed to the stalled worker is requeued and
completed elsewhere, and the dispatcher's memory stays bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate.report import percentile

from .conftest import ScenarioFactory, sizes
from .harness import Scenario, Size, known_bug, rss_mb, sleep_spec
from .ledger import COMPLETED

STALLED = "w19"
SLOTS = 4


async def _run(sc: Scenario, size: Size, stall: bool) -> dict[str, Any]:
    await sc.start_scheduler()
    dispatcher = await sc.start_dispatcher(ack_timeout="1s")
    address = f"127.0.0.1:{dispatcher.port}"
    workers = {f"w{i}": await sc.start_worker(address, f"w{i}", slots=SLOTS) for i in range(20)}
    client = await sc.client()
    sc.load(client, sleep_spec(0.02))
    samples: list[tuple[int, int, float]] = []

    async def sample() -> None:
        while True:
            waiters = sum(s.stream.lock.waiting for s in dispatcher.sessions if s.stream is not None)
            samples.append((dispatcher.sessions.leases, waiters, rss_mb()))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        if stall:
            await asyncio.sleep(0.2 * size.seconds)
            sc.fault(f"stop_reading {STALLED}")
            workers[STALLED].stop_reading()
        await sc.settle(timeout=120, quiet=1.5)
    finally:
        sampler.cancel()
    healthy = [
        r.finished_at_ms - r.submitted_at_ms
        for p in sc.ledger.results.values()
        if (r := p[0].result).worker_id != STALLED and not r.history
    ]
    return {
        "healthy_p99_ms": percentile(healthy, 99),
        "max_leases": max(s[0] for s in samples),
        "max_lock_waiters": max(s[1] for s in samples),
        "rss_growth_mb": round(samples[-1][2] - samples[0][2], 1),
        "lock_timeouts": dispatcher.stats.lock_timeouts,
    }


@pytest.mark.timeout(240)
@sizes(Size("fast", rate=80, tasks=640), Size("full", rate=120, tasks=3000))
async def test_stall(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size, label="stall_baseline") as base:
        baseline = await _run(base, size, stall=False)
        base_summary = base.summarize(**baseline)
    async with scenario(size) as sc:
        stalled = await _run(sc, size, stall=True)
        routed = [r for r in sc.ledger.requeues.values() if r.worker_id == STALLED]
        not_elsewhere = [
            r.task_id
            for r in routed
            if (first := sc.ledger.first(r.task_id)) is None or first.status != COMPLETED or first.worker_id == STALLED
        ]
        summary = sc.summarize(
            **stalled,
            baseline_healthy_p99_ms=baseline["healthy_p99_ms"],
            routed_to_stalled=len(routed),
        )
    f, b = summary.figures, base_summary.figures
    assert b["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert f["duplicated"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert routed, "assignments were routed to the stalled worker"
    assert not not_elsewhere, f"assignments of the stalled worker not completed elsewhere: {not_elsewhere[:5]}"
    assert f["completion_rate_per_s"] >= 0.95 * b["completion_rate_per_s"], "the completion rate dropped"
    assert stalled["max_leases"] <= 20 * SLOTS, "the dispatcher never holds more than the slots"
    assert stalled["rss_growth_mb"] < 100, "dispatcher memory bounded"
    known_bug(
        stalled["healthy_p99_ms"] > 2 * baseline["healthy_p99_ms"],
        f"healthy workers' p99 {stalled['healthy_p99_ms']:.0f} ms with one worker stalled vs "
        f"{baseline['healthy_p99_ms']:.0f} ms without (more than 2x)",
    )
