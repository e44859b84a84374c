"""A producer that leaves while its results are still coming costs nobody else anything, on a real broker."""

from __future__ import annotations

import asyncio
from typing import Any

from sluicegate.client import Client, TaskSpec
from sluicegate.v1 import messages_pb2

from .conftest import Stack, eventually

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


async def test_clients_closing_while_their_results_flow_never_cost_the_dispatcher_its_broker_connection(
    stack: Stack,
) -> None:
    """RabbitMQ 3.x closes a whole connection (541 INTERNAL_ERROR) when one of its channels publishes to
    a quorum queue that is being deleted. A client's results queue is one: if a client deleted it
    while a dispatcher was still publishing results there, the dispatcher lost its connection, and
    with it every worker's stream of work for the second or so it takes to reconnect."""
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    for index in range(2):
        await stack.start_worker(dispatcher, f"w{index}", slots=32)
    await stack.wait_workers_known(2)
    connection = dispatcher._connection  # the test's own probe: no public API counts reconnects
    assert connection is not None
    reconnects: list[Any] = []
    connection.reconnect_callbacks.add(lambda *args: reconnects.append(args))
    staying = await stack.client()

    for _ in range(8):
        leaving = Client(stack.broker)
        await leaving.__aenter__()
        ids = await leaving.submit_many([TaskSpec("echo", b"x") for _ in range(400)])
        # Leave with results still on their way: some in, most still to come.
        await eventually(lambda client=leaving: len(client.results) >= 40, timeout=30)
        await leaving.close()
        assert len(leaving.results) < len(ids), "the client left before all its results came"

    ids = await staying.submit_many([TaskSpec("echo", b"y") for _ in range(200)])
    results = await asyncio.wait_for(asyncio.gather(*(staying.result(i) for i in ids)), 60)
    assert all(r.status == COMPLETED for r in results)
    assert reconnects == [], "the dispatcher's broker connection was closed under it"
    assert not connection.is_closed
