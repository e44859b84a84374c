"""The broker side of attack 6, on a private node: AMQPS, one user per role (deploy/rabbitmq/definitions.json)
and state and result messages believed only from their rightful publishers.

The node is this test's own (never the shared broker): it listens for AMQPS with a certificate made
here, and loads the very definitions file compose uses, so the users and permissions tested are
the ones deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from sluicegate import amqp
from sluicegate.cli import demo_worker
from sluicegate.client import Client
from sluicegate.errors import BrokerRefused
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2
from sluicegate_dispatcher.app import Dispatcher
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.app import Scheduler
from sluicegate_scheduler.settings import SchedulerSettings
from tests.chaos.broker import PrivateBroker, available
from tests.chaos.harness import free_port
from tests.tlsfiles import TestCA, make_ca

from .conftest import eventually

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not available(), reason="needs the rabbitmq-server package for a private node"),
]
DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"
TRUSTED = "sluicegate-dispatcher,sluicegate-scheduler"


class Node:
    def __init__(self, broker: PrivateBroker, tls_port: int, ca: TestCA) -> None:
        self.broker, self.tls_port, self.ca = broker, tls_port, ca

    def url(self, user: str, *, tls: bool = True) -> str:
        if tls:
            return f"amqps://{user}:{user}-dev@localhost:{self.tls_port}/"
        return f"amqp://{user}:{user}-dev@127.0.0.1:{self.broker.port}/"

    def settings(self, user: str) -> BrokerSettings:
        return BrokerSettings(
            rabbitmq_url=self.url(user), broker_tls_ca=self.ca.cert, trusted_publishers=TRUSTED, prefix="sluicegate"
        )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    ca = make_ca(tmp_path / "pki")
    server = ca.issue_server("localhost")
    tls_port = free_port()
    conf = (
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca.cert}\n"
        f"ssl_options.certfile = {server.cert}\n"
        f"ssl_options.keyfile = {server.key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        f"load_definitions = {DEFINITIONS}\n"
    )
    (tmp_path / "node").mkdir()
    broker = PrivateBroker(conf=conf, base=tmp_path / "node")
    try:
        await broker.start()
        yield Node(broker, tls_port, ca)
    finally:
        await broker.close()


async def refused(coro: Any, why: str = "ACCESS_REFUSED") -> bool:
    """Whether the broker refuses what `coro` does, saying `why` (it closes the channel)."""
    with pytest.raises((aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException)) as caught:
        await coro
    return why in repr(caught.value)


async def test_roles_over_amqps_and_what_a_client_user_cannot_do(node: Node) -> None:
    scheduler = Scheduler(SchedulerSettings(), node.settings("sluicegate-scheduler"))
    dispatcher = Dispatcher(DispatcherSettings(listen="127.0.0.1:0"), node.settings("sluicegate-dispatcher"))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(scheduler)
        await stack.enter_async_context(dispatcher)
        worker = demo_worker(f"127.0.0.1:{dispatcher.port}", 4, "w-1")
        await stack.enter_async_context(worker)
        await asyncio.wait_for(worker.registered.wait(), 10)
        await eventually(lambda: any(w.ready for w in scheduler.pool), timeout=10)
        client = await stack.enter_async_context(Client(node.settings("sluicegate-client")))
        ids = [await client.submit("echo", f"t{i}") for i in range(20)]
        results = [await client.result(task_id, timeout=30) for task_id in ids]
        assert all(r.status == messages_pb2.TASK_STATUS_COMPLETED for r in results)  # the user_ids were accepted

        # With the client's credentials: no reading of others' results or of sessions, no forging.
        connection = await aio_pika.connect(node.url("sluicegate-client", tls=False))
        async with connection:
            mine = f"sluicegate.results.{uuid.uuid4().hex}"

            async def bind(source: str, key: str) -> None:
                channel = await connection.channel()
                queue = await channel.declare_queue(mine, durable=True, arguments=amqp.quorum())
                await queue.bind(source, routing_key=key)

            assert await refused(bind("sluicegate.events", "state.#"))
            assert await refused(bind("sluicegate.events", "result.#"))
            assert await refused(bind("sluicegate.dead", ""))
            assert await refused(bind("sluicegate.requeue", ""))
            assert await refused(bind("sluicegate.tasks.unrouted", ""))  # other tenants' first tasks
            await bind("sluicegate.events", f"result.{uuid.uuid4().hex}")  # its own results: allowed

            async def publish(key: str, exchange: str = "sluicegate.events", **properties: Any) -> None:
                channel = await connection.channel(publisher_confirms=True)
                target = await channel.get_exchange(exchange, ensure=False)
                await target.publish(aio_pika.Message(b"forged", **properties), routing_key=key)

            assert await refused(publish(f"state.{dispatcher.id}"))
            assert await refused(publish(f"result.{client.client_id}"))
            assert await refused(publish("lifecycle.x"))
            # The broker checks user_id: a client cannot pass for a dispatcher, wherever it publishes.
            impostor = {"user_id": "sluicegate-dispatcher"}
            assert await refused(
                publish("default", "sluicegate.tasks", **impostor), "PRECONDITION_FAILED"
            )  # user_id is checked

        # The recorder's user (also `sluicegate migrate`'s) declares and reads its queue, and nothing else.
        recorder = await amqp.connect_broker(node.settings("sluicegate-recorder"))
        async with recorder:
            channel = await recorder.channel()
            lifecycle = await amqp.declare_lifecycle_queue(channel, amqp.Topology("sluicegate"))

            async def take(message: Any) -> None:
                await message.ack()

            await lifecycle.consume(take)
            channel = await recorder.channel()
            queue = await channel.get_queue("sluicegate.lifecycle", ensure=False)
            assert await refused(queue.bind("sluicegate.events", routing_key="state.#"))

        # Even a user allowed to publish anywhere is not believed as a publisher of state or results.
        await node.broker.ctl("add_user", "mallory", "mallory-dev")
        await node.broker.ctl("set_permissions", "-p", "/", "mallory", ".*", ".*", ".*")
        admin = await aio_pika.connect(node.url("mallory", tls=False))
        async with admin:
            channel = await admin.channel(publisher_confirms=True)
            events = await channel.get_exchange("sluicegate.events", ensure=False)
            forged = messages_pb2.DispatcherState(dispatcher_id=dispatcher.id, seq=2**63, delta=False)
            forged.workers.append(
                messages_pb2.WorkerState(
                    worker_id="phantom", session_id="p", tenant="default", actions=["echo"], slots=9, free_slots=9,
                    ready=True,
                )
            )  # fmt: skip
            await amqp.publish(events, f"state.{dispatcher.id}", forged.SerializeToString(), mandatory=False)
            pending = await client.submit("sleep", {"seconds": 0.5})
            fake = messages_pb2.TaskResult(
                task_id=pending, status=messages_pb2.TASK_STATUS_COMPLETED, output=b"forged", worker_id="w-1"
            )
            body = messages_pb2.TaskResultBatch(results=[fake]).SerializeToString()
            await amqp.publish(events, f"result.{client.client_id}", body)
            await eventually(lambda: scheduler.untrusted >= 1 and client.untrusted >= 1, timeout=10)
        result = await client.result(pending, timeout=30)
        assert result.output != b"forged"
        assert result.status == messages_pb2.TASK_STATUS_COMPLETED
        assert {w.worker_id for w in scheduler.pool} == {"w-1"}


async def test_each_role_user_may_use_every_scheduler_partition(node: Node) -> None:
    """With two partitions, each role's user reaches the names of partition 1 too (`<prefix>.p1.*`)."""

    def parted(user: str) -> BrokerSettings:
        return node.settings(user).model_copy(update={"partitions": 2})

    schedulers = [Scheduler(SchedulerSettings(partition=k), parted("sluicegate-scheduler")) for k in (0, 1)]
    dispatcher = Dispatcher(DispatcherSettings(listen="127.0.0.1:0"), parted("sluicegate-dispatcher"))
    async with contextlib.AsyncExitStack() as stack:
        for scheduler in schedulers:
            await stack.enter_async_context(scheduler)
        await stack.enter_async_context(dispatcher)
        worker = demo_worker(f"127.0.0.1:{dispatcher.port}", 1, "w-1")  # one slot: requeues too
        await stack.enter_async_context(worker)
        await asyncio.wait_for(worker.registered.wait(), 10)
        await eventually(lambda: all(any(w.ready for w in s.pool) for s in schedulers), timeout=10)
        client = await stack.enter_async_context(Client(parted("sluicegate-client")))
        ids = [await client.submit("echo", f"t{i}", partition_key=f"k{i}") for i in range(20)]
        results = [await client.result(task_id, timeout=60) for task_id in ids]
        assert all(r.status == messages_pb2.TASK_STATUS_COMPLETED for r in results)
        assert all(s.stats.assigned > 0 for s in schedulers), "both partitions scheduled"


async def test_a_client_user_before_any_scheduler_ran_is_told_to_start_one_and_leaves_nothing_behind(
    node: Node,
) -> None:
    """A client may not bind the task queue (that would need read on `tasks.unrouted`, where it could
    bind a queue of its own and see other tenants' first tasks): where no scheduler made it yet, the
    client says so, and leaves no unbound queue for the next one to trust."""
    for _ in range(2):  # the second try meets the same answer: nothing was left half made
        with pytest.raises(BrokerRefused) as refusal:
            async with Client(node.settings("sluicegate-client")):
                pass
        assert "no queue 'sluicegate.tasks' yet" in str(refusal.value)
        assert "start a scheduler first" in str(refusal.value)
    admin = await aio_pika.connect(f"amqp://sluicegate:sluicegate@127.0.0.1:{node.broker.port}/")
    async with admin:
        assert not await amqp.queue_exists(admin, "sluicegate.tasks")
