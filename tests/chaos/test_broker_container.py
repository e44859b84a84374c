"""Scenarios 10 and 11: RabbitMQ in a container, frozen (`docker pause`) or cut off (`docker network disconnect`) under load.

Each scenario injects a short fault, which connections ride out (TCP holds, the AMQP heartbeat,
5 s here, has not expired), and a long one, after which every client has given up its
connection and must build it again. Nothing may be lost or completed twice, and the scenario
states how long after each fault was lifted work flowed again: the first result of a task
submitted after the lift (`recovery_ms`).

They need a Docker engine and the locally built RabbitMQ image; `make chaos` provides both. The
default `pytest` run skips them (SLUICEGATE_CHAOS_CONTAINERS=1 runs their fast size).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from .conftest import MODE, ScenarioFactory, sizes
from .container import ContainerBroker, unavailable
from .harness import Scenario, Size, sleep_spec
from .ledger import Ledger

# In the fast subset only when asked for (SLUICEGATE_CHAOS_CONTAINERS=1): they need an engine.
pytestmark = pytest.mark.skipif(
    MODE not in ("full", "all") and os.environ.get("SLUICEGATE_CHAOS_CONTAINERS") != "1",
    reason="container faults run with `make chaos` (or SLUICEGATE_CHAOS_CONTAINERS=1)",
)


@pytest.fixture
async def container_broker() -> AsyncIterator[ContainerBroker]:
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    broker = ContainerBroker()
    try:
        await broker.start()
        yield broker
    finally:
        await broker.close()


def recovery_ms(ledger: Ledger, lifted_ms: int) -> int | None:
    """From a fault's lift to the first result seen for a task whose submit was confirmed after it."""
    seen = [
        published[0].seen_ms
        for task_id, published in ledger.results.items()
        if published and ledger.confirmed.get(task_id, 0) >= lifted_ms
    ]
    return min(seen) - lifted_ms if seen else None


async def _run_with_faults(
    sc: Scenario,
    size: Size,
    start: Callable[[], Awaitable[None]],
    lift: Callable[[], Awaitable[None]],
    what: str,
    faults: list[tuple[float, float]],
) -> dict[str, int | None]:
    """Start a stack, load it, and inject `faults` as (when, fraction of the run; how long, seconds)."""
    await sc.start_scheduler()
    dispatchers = [await sc.start_dispatcher(), await sc.start_dispatcher()]
    for i in range(6):
        await sc.start_worker(f"127.0.0.1:{dispatchers[i % 2].port}", f"w{i}", slots=16)
    client = await sc.client()
    load = sc.load(client, sleep_spec(0.05))
    loop = asyncio.get_running_loop()
    lifted: list[int] = []
    for at, seconds in faults:
        await asyncio.sleep(max(0.0, at * size.seconds - (loop.time() - load.started_at)))
        sc.fault(f"{what} {seconds:.0f}s")
        await start()
        await asyncio.sleep(seconds)
        await lift()
        lifted.append(sc.fault(f"{what} lifted"))
    await sc.settle(timeout=240, quiet=3.0)
    figures: dict[str, int | None] = {}
    for (_, seconds), at in zip(faults, lifted, strict=True):
        figures[f"recovery_ms_after_{seconds:.0f}s"] = recovery_ms(sc.ledger, at)
    return figures


def _check(figures: dict[str, object]) -> None:
    assert figures["lost"] == 0, f"lost {figures['lost_ids']}"
    assert figures["stale_accepted"] == 0, f"completions of superseded attempts accepted: {figures['stale_ids']}"
    assert figures["double_completed"] == 0, f"completed twice: {figures['duplicated_ids']}"
    assert not figures["undelivered_to_client"], f"{figures['undelivered_to_client']} results never reached the client"
    for key, value in figures.items():
        if key.startswith("recovery_ms"):
            assert value is not None, f"{key}: no task submitted after the fault ever completed"


FAULTS = [(0.15, 4.0), (0.40, 20.0)]


@pytest.mark.timeout(420)
@sizes(Size("fast", rate=100, tasks=4000), Size("full", rate=200, tasks=9000))
async def test_broker_container_pause(scenario: ScenarioFactory, container_broker: ContainerBroker, size: Size) -> None:
    async with scenario(size, url=container_broker.url) as sc:
        recovery = await _run_with_faults(
            sc, size, container_broker.pause, container_broker.unpause, "docker pause", FAULTS
        )
        summary = sc.summarize(heartbeat_s=container_broker.heartbeat_s, **recovery)
    _check(summary.figures)


@pytest.mark.timeout(420)
@sizes(Size("fast", rate=100, tasks=4000), Size("full", rate=200, tasks=9000))
async def test_broker_container_partition(
    scenario: ScenarioFactory, container_broker: ContainerBroker, size: Size
) -> None:
    async with scenario(size, url=container_broker.url) as sc:
        recovery = await _run_with_faults(
            sc, size, container_broker.disconnect, container_broker.connect, "network disconnect", FAULTS
        )
        summary = sc.summarize(heartbeat_s=container_broker.heartbeat_s, **recovery)
    _check(summary.figures)
