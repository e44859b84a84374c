"""Scenarios on a private three-node cluster, under load: the leaders' node killed, a node frozen, a rolling restart.

Every part (scheduler, dispatchers, client, observer) is given all three node addresses and
fails over between them by itself; the quorum queues have a replica on every node (RabbitMQ
3.10's default group size is 3). Each scenario reports, besides the usual figures, how long
tasks stopped flowing around each fault (`gap_ms`) and how long the tasks caught by it waited
(`recovery_ms`: p50 / p99 / max of submit-to-result for those submitted from 1 s before the
fault until the cluster was whole again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from typing import Any

import pytest

from sluicegate.wire import now_ms

from .broker import QUEUES, PrivateBroker, PrivateCluster
from .conftest import ScenarioFactory, full_only, sizes
from .harness import Scenario, Size, known_bug, sleep_spec
from .ledger import flow_after

# After a fault, the window in which a silence counts as tasks not flowing, when nothing else ends it.
WINDOW_MS = 10_000
SETTLE_S = float(os.environ.get("SLUICEGATE_CHAOS_SETTLE_S", "120"))


async def start_stack(sc: Scenario) -> Any:
    """A scheduler, two dispatchers and six workers (each knowing both dispatchers), all in-process."""
    scheduler = await sc.start_scheduler()
    dispatchers = [await sc.start_dispatcher(), await sc.start_dispatcher()]
    a, b = (f"127.0.0.1:{d.port}" for d in dispatchers)
    for i in range(6):
        await sc.start_worker([a, b] if i % 2 == 0 else [b, a], f"w{i}", slots=12)
    return scheduler


async def tasks_leader(cluster: PrivateCluster, sc: Scenario) -> tuple[PrivateBroker, str]:
    """The node holding the leader of the `tasks` queue, and how many of the scenario's queues it leads."""
    leaders = await cluster.leaders(sc.prefix + ".")
    node = leaders[sc.topology.tasks]
    return cluster.by_name(node), f"{Counter(leaders.values())[node]} of {len(leaders)}"


def parts_on(sc: Scenario, node: PrivateBroker) -> list[str]:
    """Which in-process parts have their broker connection on `node` (diagnostics for the table)."""
    parts: list[tuple[str, Any]] = [("observer", sc.observer)]
    parts += [("scheduler", s) for s in sc.schedulers] + [
        (f"dispatcher{i + 1}", d) for i, d in enumerate(sc.dispatchers)
    ]
    parts += [("client", c) for c in sc.clients]
    on = []
    for name, part in parts:
        connection = getattr(part, "connection", None) or getattr(part, "_connection", None)
        url = getattr(connection, "url", None)
        if url is not None and url.port == node.port:
            on.append(name)
    return on


def at_fraction(sc: Scenario, fraction: float) -> float:
    """Seconds to wait until `fraction` of the load's planned duration has passed."""
    load = sc.loads[0]
    return max(0.0, fraction * sc.size.seconds - (asyncio.get_running_loop().time() - load.started_at))


class LoopLag:
    """The longest the test's event loop (where the in-process parts run) was late, in ms."""

    def __init__(self, tick: float = 0.05) -> None:
        self.tick, self.worst_ms = tick, 0.0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick)
            self.worst_ms = max(self.worst_ms, (loop.time() - before - self.tick) * 1000)

    def stop(self) -> int:
        self._task.cancel()
        return round(self.worst_ms)


def flowed_between(sc: Scenario, start_ms: int, end_ms: int) -> int:
    """Tasks finished in (start, end]: tasks flowing while a node was away."""
    return sum(1 for p in sc.ledger.results.values() if p and start_ms < p[0].result.finished_at_ms <= end_ms)


async def settle(sc: Scenario, cluster: PrivateCluster, timeout: float) -> None:
    """Wait for every task to end; if they do not, print what the cluster holds for the scenario."""
    try:
        await sc.settle(timeout=timeout, quiet=2.0)
    except AssertionError:
        try:
            print(f"--- the cluster, for {sc.prefix}:\n{await cluster.describe(sc.prefix)}")
        except Exception as err:
            print(f"--- the cluster could not be described: {err!r}")
        raise


def check_invariants(f: dict[str, Any]) -> None:
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["stale_accepted"] == 0, f"completions of superseded attempts accepted: {f['stale_ids']}"
    # At-least-once, counted (`duplicated`, `double_completed`): an assignment whose confirm was
    # lost with a node is placed again as the same attempt, and both copies can run.
    assert not f["undelivered_to_client"], f"{f['undelivered_to_client']} results never reached the client"


async def replicated_everywhere(cluster: PrivateCluster, queue: str) -> bool:
    return await cluster.members(queue) == {n.node for n in cluster.nodes}


@pytest.mark.timeout(300)
@sizes(Size("fast", rate=100, tasks=1000), Size("full", rate=100, tasks=6000))
async def test_cluster_leader_kill(scenario: ScenarioFactory, private_cluster: PrivateCluster, size: Size) -> None:
    down_s = 4.0 if size.name == "fast" else 8.0
    async with scenario(size, url=private_cluster.url) as sc:
        await start_stack(sc)
        client = await sc.client()
        sc.load(client, sleep_spec(0.05))
        assert await replicated_everywhere(private_cluster, sc.topology.tasks)
        await asyncio.sleep(at_fraction(sc, 0.3))

        victim, held = await tasks_leader(private_cluster, sc)
        connected = parts_on(sc, victim)
        lag = LoopLag()
        killed = sc.fault(f"SIGKILL {victim.node}")
        await victim.kill()
        await asyncio.sleep(down_s)
        restarted = sc.fault(f"restart {victim.node}")
        began = time.monotonic()
        await victim.start()
        await private_cluster.wait_members(3)
        rejoin_s = time.monotonic() - began
        whole = now_ms()

        await settle(sc, private_cluster, 180)
        flow = flow_after(sc.ledger, [(killed, min(whole, killed + WINDOW_MS))])
        while_down = flowed_between(sc, killed, restarted)
        summary = sc.summarize(
            killed_node=victim.node.split("@")[0],
            leaders_held=held,
            connected_to_it="+".join(connected) or "none",
            down_s=down_s,
            rejoin_s=round(rejoin_s, 1),
            completed_while_down=while_down,
            loop_lag_ms=lag.stop(),
            **flow,
        )
        still_replicated = await replicated_everywhere(private_cluster, sc.topology.tasks)
    check_invariants(summary.figures)
    assert while_down > 0, "no task completed while the leaders' node was down"
    assert still_replicated, "the tasks queue lost a replica across the restart"


@pytest.mark.timeout(420)
@full_only(Size("full", rate=100, tasks=6000))
async def test_cluster_node_frozen(scenario: ScenarioFactory, private_cluster: PrivateCluster, size: Size) -> None:
    # Longer than Raft takes to elect new leaders (about 7 s) and than three missed AMQP heartbeats
    # (the clients' own detection, 18 s at the default 5 s), shorter than the Erlang distribution's
    # net_ticktime (60 s), after which the others would declare it down and see a partition. Until
    # then the cluster's metadata still names the frozen node as those queues' leader, so a client
    # that reconnects meanwhile waits for it (RabbitMQ 3.10): what was not connected to it flows on.
    freeze_s = 25.0
    async with scenario(size, url=private_cluster.url) as sc:
        await start_stack(sc)
        client = await sc.client()
        sc.load(client, sleep_spec(0.05))
        await asyncio.sleep(at_fraction(sc, 0.25))

        victim, held = await tasks_leader(private_cluster, sc)
        connected = parts_on(sc, victim)
        lag = LoopLag()
        frozen = sc.fault(f"SIGSTOP {victim.node}")
        victim.pause()
        await asyncio.sleep(freeze_s)
        resumed = sc.fault(f"SIGCONT {victim.node}")
        victim.resume()
        await private_cluster.wait_members(3, timeout=120)
        whole = now_ms()

        try:
            await settle(sc, private_cluster, SETTLE_S)
            stuck = ""
        except AssertionError as err:  # reported below, with the figures, as a known bug
            stuck = str(err)
        flow = flow_after(sc.ledger, [(frozen, whole)])
        while_frozen = flowed_between(sc, frozen, resumed)
        new_leader, _ = await tasks_leader(private_cluster, sc)
        summary = sc.summarize(
            settled=not stuck,
            unconfirmed_submits=size.tasks - len(sc.ledger.confirmed),
            frozen_node=victim.node.split("@")[0],
            leaders_held=held,
            frozen_s=freeze_s,
            connected_to_it="+".join(connected) or "none",
            completed_while_frozen=while_frozen,
            tasks_leader_moved=new_leader is not victim,
            loop_lag_ms=lag.stop(),
            **flow,
        )
    # Seen in some runs, depending on which parts were connected to the frozen node: after it is
    # back, a part that failed over away from it does not recover within the window (the
    # scheduler's exclusive state queue is still locked by its old connection, so its channel
    # cannot be restored; or the client's submits stay unconfirmed). Nothing is lost (the tasks
    # are in the broker's queues), but they do not flow: see RELIABILITY.md, "Open".
    known_bug(bool(stuck), f"not settled {SETTLE_S:.0f}s after the frozen node came back: {stuck[:200]}")
    known_bug(
        summary.figures["confirmed"] != size.tasks,
        f"{size.tasks - summary.figures['confirmed']} submits never confirmed after the frozen node came back",
    )
    check_invariants(summary.figures)
    assert not sc.loads[0].errors, f"submits failed: {sc.loads[0].errors[:3]}"


@pytest.mark.timeout(480)
@full_only(Size("full", rate=100, tasks=9000))
async def test_cluster_rolling_restart(scenario: ScenarioFactory, private_cluster: PrivateCluster, size: Size) -> None:
    async with scenario(size, url=private_cluster.url) as sc:
        await start_stack(sc)
        client = await sc.client()
        sc.load(client, sleep_spec(0.05))
        await asyncio.sleep(at_fraction(sc, 0.1))

        windows: list[tuple[int, int]] = []
        waited_s: list[float] = []
        lag = LoopLag()
        for node in private_cluster.nodes:
            began = time.monotonic()
            await not_quorum_critical(node)  # what an operator (or the k8s operator) checks first
            waited_s.append(round(time.monotonic() - began, 1))
            stopped = sc.fault(f"restart {node.node}")
            await node.shutdown()
            await node.start()
            await private_cluster.wait_members(3)
            windows.append((stopped, now_ms()))

        await settle(sc, private_cluster, SETTLE_S)
        flow = flow_after(sc.ledger, windows)
        restarts_s = [round((end - start) / 1000, 1) for start, end in windows]
        summary = sc.summarize(restart_s=restarts_s, quorum_wait_s=waited_s, loop_lag_ms=lag.stop(), **flow)
        still_replicated = await replicated_everywhere(private_cluster, sc.topology.tasks)
    check_invariants(summary.figures)
    assert still_replicated, "the tasks queue lost a replica across the rolling restart"


async def not_quorum_critical(node: PrivateBroker, timeout: float = 180) -> None:
    """Until stopping `node` would leave every quorum queue with a majority of its replicas."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(RuntimeError, TimeoutError):  # critical, or too busy to answer yet
            await node.ctl("check_if_node_is_quorum_critical", tool=QUEUES, timeout=60)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.node} stayed quorum-critical for {timeout}s")
        await asyncio.sleep(1.0)
