"""Failover between broker addresses, against the real broker reached through two TCP proxies.

Each proxy stands for a cluster node; taking one away leaves the other. The connection must
move to the surviving address by itself and keep what a robust connection restores: the
channel, its QoS, the declared queue and its consumer; a confirmed publish works again.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aio_pika.abc import AbstractIncomingMessage
from yarl import URL

from sluicegate import amqp
from sluicegate.errors import PublishError
from sluicegate.failover import FailoverConnection
from sluicegate.settings import split_urls
from tests.chaos.proxy import FlakyProxy

from .conftest import eventually

pytestmark = pytest.mark.timeout(60)


async def test_a_lost_address_moves_the_connection_to_the_next_with_consumers_restored(rabbitmq_url: str) -> None:
    broker = URL(split_urls(rabbitmq_url)[0])
    proxies = [await FlakyProxy(broker.host or "127.0.0.1", broker.port or 5672).start() for _ in range(2)]
    urls = [str(broker.with_host("127.0.0.1").with_port(p.port)) for p in proxies]
    name = f"t-failover-{uuid.uuid4().hex[:8]}"
    received: list[bytes] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append(message.body)
        await message.ack()

    connection = await amqp.connect(urls, deadline=10, heartbeat=2)
    assert isinstance(connection, FailoverConnection)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=10)
        queue = await channel.declare_queue(name, durable=True, arguments=amqp.quorum())
        await queue.consume(on_message)
        await amqp.publish(channel.default_exchange, name, b"before")
        await eventually(lambda: received == [b"before"])

        used = next(p for p in proxies if p.connections)
        other = next(p for p in proxies if p is not used)
        await used.close()  # that "node" is gone: its connections reset, new ones refused

        await eventually(lambda: other.connections > 0 and connection.connected.is_set(), timeout=20)
        assert connection.failovers >= 1
        await amqp.publish_until_confirmed(channel.default_exchange, name, b"after", timeout=5)
        await eventually(lambda: b"after" in received, timeout=20)
        check = await connection.channel()
        declared = await check.declare_queue(name, passive=True)
        assert declared.declaration_result.consumer_count == 1, "the consumer was restored on the new connection"
        await check.close()
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(name)
        await connection.close()
        for proxy in proxies:
            await proxy.close()


async def test_first_connect_skips_an_address_that_is_down(rabbitmq_url: str) -> None:
    broker = URL(split_urls(rabbitmq_url)[0])
    proxy = await FlakyProxy(broker.host or "127.0.0.1", broker.port or 5672).start()
    dead = await FlakyProxy("127.0.0.1", 1).start()  # accepts, then cannot reach anything: hangs up
    await dead.close()  # and now refuses
    urls = [str(broker.with_port(dead.port)), str(broker.with_host("127.0.0.1").with_port(proxy.port))]
    try:
        for _ in range(4):  # whichever address it starts at
            connection = await asyncio.wait_for(amqp.connect(urls, deadline=5), 10)
            assert connection.connected.is_set()
            await connection.close()
    finally:
        await proxy.close()


async def test_a_nacked_publish_raises_and_renews_the_channel(rabbitmq_url: str) -> None:
    """A nack retires the channel it came through (see amqp.renew_channel); the next publish uses a new one."""
    name = f"t-nack-{uuid.uuid4().hex[:8]}"
    connection = await amqp.connect(rabbitmq_url, deadline=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Full at one message, and refusing more: the broker nacks the second publish at once (a
        # classic queue applies the limit at once; a quorum queue a little later).
        args = {"x-max-length": 1, "x-overflow": "reject-publish"}
        queue = await channel.declare_queue(name, durable=False, arguments=args)
        await amqp.publish(channel.default_exchange, name, b"one")
        before = await channel.get_underlay_channel()
        with pytest.raises(PublishError, match="nacked"):
            await amqp.publish(channel.default_exchange, name, b"two")
        await eventually(lambda: not channel.is_closed, timeout=5)
        await channel.ready()
        assert await channel.get_underlay_channel() is not before, "the channel was renewed"
        message = await queue.get(timeout=5)
        await message.ack()
        await amqp.publish(channel.default_exchange, name, b"three")  # through the new channel
        assert (await queue.get(timeout=5)).body == b"three"
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(name)
        await connection.close()
