"""Scenario 7: SIGTERM to one of two dispatchers (subprocesses) under load: a graceful drain.

Readiness goes off, it stops consuming its inbox, settles or requeues what it holds, tells its
workers to reconnect elsewhere and exits within its grace; nothing lost, no duplicate from the drain.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from sluicegate import amqp
from sluicegate.wire import now_ms

from .conftest import ScenarioFactory, sizes
from .harness import Size, health_status, sleep_spec, two_dispatchers

GRACE_S = 5


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=120, tasks=960), Size("full", rate=300, tasks=4500))
async def test_drain(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size) as sc:
        env = {"SLUICEGATE_DISPATCHER_DRAIN_GRACE": f"{GRACE_S}s"}
        draining, ids, ports, _, workers = await two_dispatchers(sc, **env)
        client = await sc.client()
        sc.load(client, sleep_spec(0.1))
        await asyncio.sleep(0.4 * size.seconds)

        on_drained = workers[::2]
        registrations = {w.worker_id: w.stats.registrations for w in on_drained}
        connection = await amqp.connect(sc.url, deadline=10)
        channel = await connection.channel()

        async def inbox_consumers() -> int:
            # On the underlying channel: a robust channel answers a repeated passive declare from its cache.
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(sc.topology.inbox(ids[0]), passive=True)
            return int(declared.consumer_count or 0)

        marks: dict[str, int] = {}
        sigterm_at = sc.fault(f"SIGTERM dispatcher {ids[0]}")
        draining.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GRACE_S + 5
        while loop.time() < deadline and len(marks) < 4:
            now = now_ms() - sigterm_at
            if "readiness_off_ms" not in marks and await health_status(ports[0]) != "SERVING":
                marks["readiness_off_ms"] = now
            if "stopped_consuming_ms" not in marks and await inbox_consumers() == 0:
                marks["stopped_consuming_ms"] = now
            if "workers_moved_ms" not in marks and all(
                w.stats.registrations > registrations[w.worker_id] for w in on_drained
            ):
                marks["workers_moved_ms"] = now
            if "exited_ms" not in marks and draining.process.returncode is not None:
                marks["exited_ms"] = now
            await asyncio.sleep(0.05)
        await connection.close()
        exit_code = draining.process.returncode
        await sc.settle(timeout=120, quiet=2.0)
        drained = [r for r in sc.ledger.requeues.values() if r.reason == "draining"]
        summary = sc.summarize(**marks, exit_code=exit_code, drain_requeues=len(drained), grace_s=GRACE_S)
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert f["duplicated"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert set(marks) == {"readiness_off_ms", "stopped_consuming_ms", "workers_moved_ms", "exited_ms"}, marks
    assert exit_code == 0, f"the drained dispatcher exited with {exit_code}"
    assert marks["readiness_off_ms"] < 1000
    assert marks["exited_ms"] < (GRACE_S + 2) * 1000, "exits within its grace (plus the server's stop grace)"
