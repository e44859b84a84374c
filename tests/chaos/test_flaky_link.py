"""Scenario 2: a flaky link. A TCP proxy in the test cuts, stalls and slows the services' broker
connections and the workers' gRPC connections, under load; nothing may be lost or completed twice."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from .conftest import ScenarioFactory, sizes
from .harness import Size, eventually, sleep_spec
from .proxy import FlakyProxy


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=120, tasks=1200), Size("full", rate=300, tasks=4500))
async def test_flaky_link(scenario: ScenarioFactory, shared_url: str, size: Size) -> None:
    target = urlsplit(shared_url)
    amqp_link = await FlakyProxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    via = shared_url.replace(f"{target.hostname}:{target.port or 5672}", amqp_link.address)
    try:
        async with scenario(size) as sc:
            scheduler = await sc.start_scheduler(url=via)
            dispatcher = await sc.start_dispatcher(url=via)
            grpc_link = await FlakyProxy("127.0.0.1", dispatcher.port).start()
            try:
                workers = [await sc.start_worker(grpc_link.address, f"w{i}", slots=12) for i in range(6)]
                client = await sc.client()  # direct: the client's own queue is scenario 1's concern
                load = sc.load(client, sleep_spec(0.05))
                loop = asyncio.get_running_loop()
                span = size.seconds

                async def at(fraction: float) -> None:
                    await asyncio.sleep(max(0.0, fraction * span - (loop.time() - load.started_at)))

                await at(0.10)
                sc.fault("amqp cut")
                amqp_link.cut()
                await at(0.20)
                sc.fault("amqp stall")
                amqp_link.stall()
                await asyncio.sleep(2.0)
                amqp_link.unstall()
                await at(0.35)
                sc.fault("amqp slow")
                amqp_link.slow(0.005)
                await asyncio.sleep(2.0)
                amqp_link.slow(0)
                await at(0.50)
                sc.fault("grpc cut")
                grpc_link.cut()
                await at(0.60)
                await eventually(lambda: dispatcher.sessions.leases > 0, 10, 0.005, "workers hold tasks")
                sc.fault("grpc stall")  # longer than keepalive (1 s + 1 s): streams are declared dead
                grpc_link.stall()
                await asyncio.sleep(5.0)
                grpc_link.unstall()
                await at(0.80)
                sc.fault("grpc slow")
                grpc_link.slow(0.02)
                await asyncio.sleep(2.0)
                grpc_link.slow(0)

                await sc.settle(timeout=120, quiet=2.0)
                summary = sc.summarize(
                    worker_reconnects=sum(w.stats.reconnects for w in workers),
                    scheduler_duplicate_tasks=scheduler.stats.duplicate_tasks,
                    dispatcher_redeliveries=dispatcher.stats.redeliveries,
                )
            finally:
                await grpc_link.close()
    finally:
        await amqp_link.close()
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"completions of superseded attempts accepted: {f['stale_ids']}"
    assert f["duplicated"] == 0, f"more than one result: {f['duplicated_ids']}"
    assert f["undelivered_to_client"] == 0
    assert sum(f["requeued"].values()) > 0, "the gRPC stall outlived keepalive: the stalled attempts were requeued"
