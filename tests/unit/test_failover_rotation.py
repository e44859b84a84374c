"""Unit tests of FailoverConnection: every attempt goes to the next address, pauses are short until all failed.

No broker: three local TCP listeners that record each connection and hang up at once stand in
for broker nodes that are down, so aio-pika's own reconnect loop drives the rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from sluicegate import amqp
from sluicegate.errors import PublishError
from sluicegate.failover import QUICK_RETRY, FailoverConnection, masked, with_heartbeat

pytestmark = pytest.mark.timeout(20)


class DeadNodes:
    """Listeners that accept a connection, note which one was reached and when, and close it."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.contacts: list[tuple[int, float]] = []

    async def start(self, count: int) -> DeadNodes:
        for i in range(count):
            self.servers.append(await asyncio.start_server(self._hang_up(i), "127.0.0.1", 0))
        return self

    def _hang_up(self, index: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.contacts.append((index, asyncio.get_running_loop().time()))
            writer.transport.abort()

        return handle

    @property
    def urls(self) -> list[str]:
        return [f"amqp://guest:secret@127.0.0.1:{s.sockets[0].getsockname()[1]}/" for s in self.servers]

    @property
    def order(self) -> list[int]:
        return [i for i, _ in self.contacts]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)


@pytest.fixture
async def nodes() -> AsyncIterator[DeadNodes]:
    dead = await DeadNodes().start(3)
    yield dead
    await dead.close()


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_each_attempt_goes_to_the_next_address_and_pauses_fully_only_after_a_round(nodes: DeadNodes) -> None:
    interval = 0.6
    connection = FailoverConnection(nodes.urls, start=1, reconnect_interval=interval, fail_fast="0")
    runner = asyncio.create_task(connection.connect(timeout=1))
    try:
        await until(lambda: len(nodes.contacts) >= 7)
    finally:
        await connection.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert nodes.order[:7] == [1, 2, 0, 1, 2, 0, 1]
    times = [t for _, t in nodes.contacts[:7]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Within a round the next address is tried after a short jittered pause; after every address
    # failed in a row, the connection's own reconnect interval applies.
    for i, gap in enumerate(gaps):
        if i % 3 == 2:
            assert gap >= interval * 0.95, f"gap {i} was {gap:.3f}s, the full interval was expected"
        else:
            assert gap < QUICK_RETRY[1] + 0.2, f"gap {i} was {gap:.3f}s, a quick retry was expected"
    assert connection.failovers >= 6


async def test_a_closed_connection_tries_no_more_addresses(nodes: DeadNodes) -> None:
    connection = FailoverConnection(nodes.urls, reconnect_interval=0.05, fail_fast="0")
    runner = asyncio.create_task(connection.connect(timeout=1))
    await until(lambda: len(nodes.contacts) >= 2)
    await connection.close()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    seen = len(nodes.contacts)
    await asyncio.sleep(0.5)
    assert len(nodes.contacts) == seen


async def test_one_address_behaves_as_a_robust_connection_does(nodes: DeadNodes) -> None:
    interval = 0.3
    connection = FailoverConnection(nodes.urls[:1], reconnect_interval=interval, fail_fast="0")
    runner = asyncio.create_task(connection.connect(timeout=1))
    try:
        await until(lambda: len(nodes.contacts) >= 3)
    finally:
        await connection.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert set(nodes.order) == {0}
    times = [t for _, t in nodes.contacts[:3]]
    assert all(b - a >= interval * 0.95 for a, b in itertools.pairwise(times))
    assert connection.failovers == 0


async def test_first_connect_tries_every_address_before_it_gives_up(nodes: DeadNodes) -> None:
    with pytest.raises(PublishError, match="cannot reach the broker"):
        await amqp.connect(",".join(nodes.urls), deadline=0.5)
    first_round = nodes.order[:3]
    assert sorted(first_round) == [0, 1, 2]
    start = first_round[0]
    assert first_round == [start, (start + 1) % 3, (start + 2) % 3]


async def test_first_connect_starts_at_a_random_address(nodes: DeadNodes) -> None:
    starts = set()
    for _ in range(12):
        nodes.contacts.clear()
        with pytest.raises(PublishError):
            await amqp.connect(nodes.urls, deadline=0.0)
        starts.add(nodes.order[0])
    assert len(starts) > 1  # 12 draws from 3 addresses all alike: about 1 in 180,000


def test_heartbeat_is_added_unless_the_address_names_one() -> None:
    assert with_heartbeat(URL("amqp://h/"), 5).query["heartbeat"] == "5"
    assert with_heartbeat(URL("amqp://h/?heartbeat=30"), 5).query["heartbeat"] == "30"
    assert "heartbeat" not in with_heartbeat(URL("amqp://h/"), None).query


async def test_heartbeat_reaches_every_address() -> None:
    connection = FailoverConnection(["amqp://a/", "amqp://b/?heartbeat=9"], heartbeat=4)
    assert [u.query.get("heartbeat") for u in connection.addresses] == ["4", "9"]
    await connection.close()


def test_masked_hides_the_password() -> None:
    assert "secret" not in masked(URL("amqp://u:secret@h:5672/"))
    assert masked(URL("amqp://h/")) == "amqp://h/"


async def test_needs_an_address() -> None:
    with pytest.raises(ValueError, match="address"):
        FailoverConnection([])
