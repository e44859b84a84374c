"""Scenario 5: one of two dispatchers (subprocesses) killed under load.

Its workers reconnect to the survivor (they know both addresses); its leased and queued
assignments come back through the broker (redelivery, inbox TTL) and complete; nothing is lost.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from .conftest import ScenarioFactory, sizes
from .harness import Size, eventually, sleep_spec, two_dispatchers

TTL = "3s"


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=120, tasks=960), Size("full", rate=300, tasks=4500))
async def test_dispatcher_kill(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size) as sc:
        env = {"SLUICEGATE_DISPATCHER_INBOX_TTL": TTL, "SLUICEGATE_DISPATCHER_INBOX_EXPIRES": "2m"}
        doomed, ids, _, _, workers = await two_dispatchers(sc, **env)
        client = await sc.client()
        load = sc.load(client, sleep_spec(0.1))
        await asyncio.sleep(0.4 * size.seconds)
        on_doomed = [w for w in workers[::2]]
        registrations = {w.worker_id: w.stats.registrations for w in on_doomed}
        killed_at = sc.fault(f"SIGKILL dispatcher {ids[0]}")
        doomed.signal(signal.SIGKILL)
        await eventually(
            lambda: all(w.stats.registrations > registrations[w.worker_id] for w in on_doomed),
            15,
            what="the dead dispatcher's workers registered with the survivor",
        )
        moved_ms = sc.ledger.faults[-1][0]
        from sluicegate.wire import now_ms

        moved_ms = now_ms() - killed_at
        await sc.settle(timeout=120, quiet=4.0)
        expired = [r for r in sc.ledger.requeues.values() if r.reason.startswith("broker_")]
        summary = sc.summarize(workers_moved_ms=moved_ms, expired_requeues=len(expired), inbox_ttl=TTL)
        del load
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    # A dispatcher killed after a result was confirmed but before its lease was settled leaves that
    # task to run again: at-least-once, counted under `duplicated`, never lost.
    assert expired, "the dead dispatcher's leases came back through the inbox TTL"
