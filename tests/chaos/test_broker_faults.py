"""Scenario 1: broker connections killed several times and the broker app stopped and started, under load.

On a private node the suite starts itself. Every service must recover by itself (consumers
restored, publishes retried until confirmed) and nothing may be lost or completed twice.
"""

from __future__ import annotations

import asyncio

import pytest

from .broker import PrivateBroker
from .conftest import ScenarioFactory, sizes
from .harness import Size, sleep_spec


@pytest.mark.timeout(240)
@sizes(Size("fast", rate=150, tasks=1200), Size("full", rate=300, tasks=4500))
async def test_broker_faults(scenario: ScenarioFactory, private_broker: PrivateBroker, size: Size) -> None:
    async with scenario(size, url=private_broker.url) as sc:
        scheduler = await sc.start_scheduler()
        dispatcher = await sc.start_dispatcher()
        address = f"127.0.0.1:{dispatcher.port}"
        for i in range(6):
            await sc.start_worker(address, f"w{i}", slots=16)
        client = await sc.client()
        load = sc.load(client, sleep_spec(0.05))

        # The faults, spread over the run: three connection kills, one stop/start of the app.
        span = size.seconds
        plan = [(0.15, "kill"), (0.30, "kill"), (0.45, "stop"), (0.75, "kill")]
        for at, what in plan:
            await asyncio.sleep(max(0.0, at * span - (asyncio.get_running_loop().time() - load.started_at)))
            sc.fault(what)
            if what == "kill":
                await private_broker.close_all_connections()
            else:
                await private_broker.stop_app()
                await asyncio.sleep(min(3.0, 0.15 * span))
                await private_broker.start_app()
                sc.fault("start")

        await sc.settle(timeout=150, quiet=2.0)
        summary = sc.summarize(
            scheduler_duplicate_requeues=scheduler.stats.duplicate_requeues,
            dispatcher_redeliveries=dispatcher.stats.redeliveries,
            results_unclaimed=dispatcher.stats.results_unclaimed,
        )
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"completions of superseded attempts accepted: {f['stale_ids']}"
    assert f["double_completed"] == 0, f"completed twice: {f['duplicated_ids']}"
    # The client's results queue is durable and outlives a lost connection or a broker restart.
    assert not f["undelivered_to_client"], f"{f['undelivered_to_client']} results never reached the client"
