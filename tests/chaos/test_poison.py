"""Scenario 8: poison and unroutable, under load.

A task whose dispatch always fails ends in `dead` after exactly the configured attempts (and is in
the dead queue); a handler that always fails ends `failed` after its retries; an assignment to a
dispatcher whose inbox does not exist is never silently dropped; neither is an unroutable submit.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sluicegate import amqp
from sluicegate.client import TaskSpec
from sluicegate.errors import Unroutable
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

from .conftest import ScenarioFactory, sizes
from .harness import Size, eventually

ATTEMPTS = 3
RETRIES = 2


def _spec(i: int) -> TaskSpec:
    task_id = uuid.uuid4().hex
    if i % 50 == 7:
        return TaskSpec("poison", b"never", task_id=task_id)
    if i % 40 == 3:
        return TaskSpec("fail", None, max_retries=RETRIES, task_id=task_id)
    return TaskSpec("echo", f"task-{i}".encode(), task_id=task_id)


@pytest.mark.timeout(180)
@sizes(Size("fast", rate=150, tasks=600), Size("full", rate=300, tasks=3000))
async def test_poison(scenario: ScenarioFactory, size: Size) -> None:
    async with scenario(size) as sc:
        scheduler = await sc.start_scheduler(max_dispatch_attempts=ATTEMPTS)
        dispatcher = await sc.start_dispatcher(ack_timeout="300ms")
        address = f"127.0.0.1:{dispatcher.port}"
        for i in range(4):
            await sc.start_worker(address, f"w{i}", slots=12)
        # The only worker serving `poison` never reads its stream: every dispatch of it fails.
        deaf = await sc.start_worker(address, "deaf", slots=32, actions=["poison"])
        deaf.stop_reading()
        await eventually(lambda: sum(w.ready for w in scheduler.pool) >= 5, 15, what="scheduler sees every worker")

        # A ghost dispatcher: its snapshot advertises a worker, but it has no inbox.
        ghost = f"ghost-{uuid.uuid4().hex[:6]}"
        publisher = await amqp.connect(sc.url, deadline=10)
        channel = await publisher.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await amqp.Exchanges(sc.topology).declare(channel)

        async def haunt() -> None:
            seq = now_ms() * 1000
            for _ in range(3):  # a few appearances: each costs the assignments routed to it a round trip
                seq += 1
                state = messages_pb2.DispatcherState(dispatcher_id=ghost, seq=seq, at_ms=now_ms())
                state.workers.append(
                    messages_pb2.WorkerState(
                        worker_id="phantom", session_id="phantom-session", tenant="default",
                        actions=["echo"], slots=64, free_slots=64 * 2, ready=True,  # the emptiest by far
                    )
                )  # fmt: skip
                await amqp.publish(
                    exchanges.events, sc.topology.state_key(ghost), state.SerializeToString(), mandatory=False
                )
                await asyncio.sleep(0.3 * size.seconds)

        haunting = asyncio.create_task(haunt())
        try:
            client = await sc.client()
            sc.load(client, _spec)
            await sc.settle(timeout=120, quiet=1.5)
        finally:
            haunting.cancel()
        with pytest.raises(Unroutable):  # a publish nobody can receive raises, it is never dropped
            await amqp.publish(exchanges.assign, "no-such-dispatcher", b"x", timeout=5)
        await publisher.close()

        poison = [t for t, p in sc.ledger.results.items() if p[0].result.status == messages_pb2.TASK_STATUS_DEAD]
        failed = [
            p[0].result for p in sc.ledger.results.values() if p[0].result.status == messages_pb2.TASK_STATUS_FAILED
        ]
        await eventually(lambda: all(t in sc.ledger.dead for t in poison), 10, what="every dead task in the dead queue")
        summary = sc.summarize(
            unroutable_assignments=scheduler.stats.unroutable_assignments,
            poison=len(poison),
            failed_after_retries=len(failed),
        )
    f = summary.figures
    expected_poison = sum(1 for i in range(size.tasks) if i % 50 == 7)
    expected_failed = sum(1 for i in range(size.tasks) if i % 50 != 7 and i % 40 == 3)
    assert f["lost"] == 0, f"lost {f['lost_ids']}"
    assert f["duplicated"] == 0
    assert f["stale_accepted"] == 0
    assert len(poison) == expected_poison, "every poison task, and nothing else, is dead"
    for task_id in poison:
        history = sc.ledger.first(task_id).history
        assert [r.attempt for r in history] == list(range(1, ATTEMPTS + 1)), history
        assert len(sc.ledger.dead[task_id].reasons) == ATTEMPTS
    assert len(failed) == expected_failed
    assert all(r.attempt == RETRIES + 1 for r in failed)
    assert f["unroutable_assignments"] > 0, "assignments to the ghost dispatcher came back as unroutable"
    assert f["completed"] == size.tasks - expected_poison - expected_failed
