"""Scenario 3: workers (subprocesses) killed with SIGKILL or frozen with SIGSTOP mid-task, under load.

Killed: their tasks are reassigned, kill-to-reassign p99 under a second. Frozen: detected within the
keepalive bounds; after SIGCONT their late completions of superseded attempts are all rejected.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from .conftest import ScenarioFactory, sizes
from .harness import Proc, Scenario, Size, eventually, sleep_spec

TASK_S = 0.3


async def _fleet(sc: Scenario, victims: int) -> tuple[str, list[Proc]]:
    await sc.start_scheduler()
    dispatcher = await sc.start_dispatcher()
    address = f"127.0.0.1:{dispatcher.port}"
    procs = [await sc.spawn_worker(f"victim-{i}", address, 8) for i in range(victims)]
    for i in range(4):
        await sc.start_worker(address, f"survivor-{i}", slots=8)
    await eventually(lambda: len(dispatcher.sessions) == victims + 4, 20, what="every worker registered")
    return address, procs


def _held_by(sc: Scenario, worker_id: str) -> int:
    return sum(len(s.leases) for d in sc.dispatchers for s in d.sessions if s.worker_id == worker_id)


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=100, tasks=800), Size("full", rate=200, tasks=3000))
async def test_worker_sigkill(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size) as sc:
        _, victims = await _fleet(sc, victims=4 if size.name == "fast" else 6)
        client = await sc.client()
        load = sc.load(client, sleep_spec(TASK_S))
        loop = asyncio.get_running_loop()
        killed: dict[str, int] = {}
        for n, victim in enumerate(victims[:3]):
            await asyncio.sleep(max(0.0, (0.25 + 0.2 * n) * size.seconds - (loop.time() - load.started_at)))
            name = victim.name.removeprefix("worker-")
            await eventually(lambda name=name: _held_by(sc, name) > 0, 10, 0.005, f"{name} holds a task")
            killed[name] = sc.fault(f"SIGKILL {name}")
            victim.signal(signal.SIGKILL)
        await sc.settle(timeout=120, quiet=2.0)
        _requeue_ms, _reassign_ms = sc.ledger.requeue_and_reassign_ms()
        victim_requeues = [r for r in sc.ledger.requeues.values() if r.worker_id in killed]
        summary = sc.summarize(killed=len(killed), victim_requeues=len(victim_requeues))
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert f["duplicated"] == 0, f"{f['stale_ids']} {f['duplicated_ids']}"
    assert victim_requeues, "the killed workers held tasks, and they were requeued"
    reassign = f["time_to_reassign_ms"]
    assert reassign is not None, f"kill-to-reassign {reassign}"
    assert reassign["p99"] < 1000, f"kill-to-reassign {reassign}"


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=100, tasks=800), Size("full", rate=200, tasks=3000))
async def test_worker_sigstop(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size) as sc:
        _, victims = await _fleet(sc, victims=3)
        client = await sc.client()
        load = sc.load(client, sleep_spec(TASK_S))
        loop = asyncio.get_running_loop()
        frozen: dict[str, int] = {}
        for n, victim in enumerate(victims[:2]):
            await asyncio.sleep(max(0.0, (0.25 + 0.3 * n) * size.seconds - (loop.time() - load.started_at)))
            name = victim.name.removeprefix("worker-")
            await eventually(lambda name=name: _held_by(sc, name) > 0, 10, 0.005, f"{name} holds a task")
            frozen[name] = sc.fault(f"SIGSTOP {name}")
            victim.signal(signal.SIGSTOP)
            await asyncio.sleep(4.0)  # longer than keepalive and the reconnect grace, shorter than anything else
            victim.signal(signal.SIGCONT)
            sc.fault(f"SIGCONT {name}")
        await sc.settle(timeout=120, quiet=3.0)
        detect = [
            r.seen_ms - frozen[r.worker_id]
            for r in sc.ledger.requeues.values()
            if r.worker_id in frozen and r.seen_ms >= frozen[r.worker_id]
        ]
        late_results = sum(
            1 for p in sc.ledger.results.values() for x in p if x.result.worker_id in frozen and len(p) > 1
        )
        summary = sc.summarize(frozen=len(frozen), detected_ms_max=max(detect, default=None))
    f = summary.figures
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert detect, "the frozen workers held tasks, and they were requeued"
    assert max(detect) < 4000, f"a frozen worker was noticed only after {max(detect)} ms"
    assert f["stale_accepted"] == 0, f"late completions of superseded attempts accepted: {f['stale_ids']}"
    assert f["duplicated"] == 0, f"{f['duplicated_ids']}"
    assert late_results == 0, f"{f['duplicated_ids']}"
