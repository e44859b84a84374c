"""Fuzzing every request type and every AMQP body: only documented outcomes, and no harm after.

Each RPC answers only its documented status codes, never with internals; each consumer settles
whatever it is given (dead with a reason, a result, or dropped and counted) and holds nothing;
and afterwards an honest task is still dispatched and completed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import grpc
import pytest
from hypothesis import strategies as st

from sluicegate import amqp
from sluicegate.client import Client
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.worker import TaskContext, Worker
from sluicegate_dispatcher.app import Dispatcher

from . import fuzzing
from .conftest import Stack

pytestmark = [
    pytest.mark.timeout(240),
    # The services on the loop draw from `random` while hypothesis generates in its thread.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

REGISTER = "/sluicegate.v1.WorkerService/Register"
SESSION = "/sluicegate.v1.WorkerService/Session"
REGISTER_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# A session ends: the worker closed it (UNAVAILABLE, "register again"), it named no session
# (NOT_FOUND), or it sent what it may not (INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
SESSION_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# A client still sending when the server ended the call fails its own send, and reports that as
# this status instead of the server's.
CLIENT_SIDE = (grpc.StatusCode.INTERNAL, "Internal error from Core")
INTERNALS = ("Traceback", "DecodeError", "Error parsing", "Exception", "internal error")


def _honest(address: str) -> Worker:
    worker = Worker(address, slots=4, worker_id="honest")

    async def work(ctx: TaskContext) -> bytes:
        return ctx.payload

    worker.register("work", work)
    return worker


async def _honest_task_completes(client: Client) -> None:
    task_id = await client.submit("work", b"still here")
    result = await client.result(task_id, timeout=20)
    assert result.status == messages_pb2.TASK_STATUS_COMPLETED
    assert result.output == b"still here"


async def test_fuzzed_register_requests_answer_only_documented_codes(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(register_rate=0)
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        register = channel.unary_unary(REGISTER, request_serializer=None, response_deserializer=None)

        async def check(body: bytes) -> None:
            code, details = grpc.StatusCode.OK, ""
            try:
                await register(body, timeout=5)
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details() or ""
            assert code in REGISTER_CODES, (code, details)
            assert not any(w in details for w in INTERNALS), details

        valid = worker_pb2.RegisterRequest(worker_id="w-1", actions=["fuzzed"], slots=2, labels={"k": "v"})
        bodies = st.one_of(fuzzing.register_requests().map(lambda r: r.SerializeToString()), fuzzing.mutated(valid))
        await fuzzing.fuzz(bodies, check, examples=300)
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    await _honest_task_completes(await stack.client())


async def test_fuzzed_session_streams_answer_only_documented_codes(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(register_rate=0, heartbeat_rate=0)
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        register = worker_pb2_grpc.WorkerServiceStub(channel).Register
        session = channel.stream_stream(SESSION, request_serializer=None, response_deserializer=None)

        async def check(case: tuple[bool, list[bytes]]) -> None:
            named, bodies = case
            if named:  # a real session's first message, then the fuzzed ones
                reply = await register(worker_pb2.RegisterRequest(actions=["fuzzed"], slots=2))
                hello = worker_pb2.WorkerMessage(worker_id=reply.worker_id, session_id=reply.session_id)
                bodies = [hello.SerializeToString(), *bodies]

            async def messages() -> AsyncIterator[bytes]:
                for body in bodies:
                    yield body

            call = session(messages(), timeout=10)
            with contextlib.suppress(grpc.aio.AioRpcError):  # raised by the read of a call that ended in error
                async for _ in call:
                    pass
            code = await call.code()
            details = await call.details() or ""
            if (code, details) == CLIENT_SIDE:
                return  # the server's status is checked in its log below: it never ended a call unexpectedly
            assert code in SESSION_CODES, (code, details)
            assert not any(w in details for w in INTERNALS), details

        message = fuzzing.events().map(lambda e: worker_pb2.WorkerMessage(events=[e]).SerializeToString())
        hello = worker_pb2.WorkerMessage(worker_id="w", session_id="s")
        body = st.one_of(message, fuzzing.mutated(hello), st.just(b""))
        await fuzzing.fuzz(st.tuples(st.booleans(), st.lists(body, max_size=4)), check, examples=150)
    unexpected = [r for r in caplog.records if r.getMessage().startswith("unexpected error")]
    assert unexpected == [], "the edge mapped every failure to a documented code"
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    await _honest_task_completes(await stack.client())


async def _depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


@pytest.mark.parametrize(
    ("target", "bodies"),
    [
        ("tasks", fuzzing.task_bodies),
        ("requeue", fuzzing.assignment_bodies),
        ("due", fuzzing.parked_bodies),
        ("inbox", fuzzing.assignment_bodies),
        ("state", fuzzing.state_bodies),
        ("cancels", fuzzing.cancel_bodies),
        ("results", fuzzing.result_bodies),
    ],
)
async def test_fuzzed_amqp_bodies_are_settled_and_hold_nothing(
    stack: Stack, target: str, bodies: Callable[[], st.SearchStrategy[bytes]]
) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    client = await stack.client()
    topology = amqp.Topology(stack.broker.prefix)
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchanges = await amqp.Exchanges(topology).declare(channel)
        where: dict[str, tuple[Any, str]] = {
            "tasks": (exchanges.tasks, "default"),
            "requeue": (channel.default_exchange, topology.requeue),
            "due": (channel.default_exchange, topology.due),
            "inbox": (exchanges.assign, dispatcher.id),
            "state": (exchanges.events, topology.state_key("fuzz-d1")),
            "cancels": (channel.default_exchange, topology.cancels),
            "results": (exchanges.events, topology.result_key(client.client_id)),
        }
        exchange, key = where[target]

        async def check(body: bytes) -> None:
            await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), key)

        await fuzzing.fuzz(bodies(), check, examples=120)
        await _honest_task_completes(client)
        # No broker fault was made: a session that ended would be a body that broke a consumer.
        assert scheduler.sessions_started == 1
        assert scheduler.failed is None
        assert dispatcher.failed is None
        watched = [topology.tasks, topology.requeue, topology.due, topology.inbox(dispatcher.id)]

        async def drained() -> bool:
            return all([await _depth(channel, name) == 0 for name in watched])

        await _eventually_async(drained)
        # What a consumer holds unacknowledged comes back when it goes: nothing may.
        await _close(dispatcher)
        await scheduler.close()
        await asyncio.sleep(0.5)
        held = {name: await _depth(channel, name) for name in watched}
        assert set(held.values()) == {0}, held


async def _close(dispatcher: Dispatcher) -> None:
    await dispatcher.close()


async def _eventually_async(check: Callable[[], Any], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("queues did not drain")
        await asyncio.sleep(0.1)
