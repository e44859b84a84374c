"""Attacks on the edges, with nothing but the generated stubs and the broker: each fails to do harm.

Why item 5 (undecodable bodies), 4 (no caps), 3 (sessions that never acknowledge) and 7 (bodies
that stick) of the security issue, each with an honest worker beside it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import grpc
import pytest

from sluicegate import amqp
from sluicegate.client import TaskSpec
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually
from .helpers import percentile, results_of

REGISTER = "/sluicegate.v1.WorkerService/Register"
SESSION = "/sluicegate.v1.WorkerService/Session"
INTERNALS = ("DecodeError", "Traceback", "Error parsing", "Exception", "utf-8", "RegisterRequest.FromString")


def _honest(address: str, worker_id: str = "honest", slots: int = 8) -> Worker:
    worker = Worker(address, slots=slots, worker_id=worker_id)

    async def work(ctx: TaskContext) -> bytes:
        return ctx.payload

    worker.register("work", work)
    return worker


async def _raw_register(channel: grpc.aio.Channel, body: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(REGISTER, request_serializer=None, response_deserializer=None)
    try:
        await call(body, timeout=5)
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        leaked = [word for word in INTERNALS if word in details]
        return grpc.StatusCode.UNKNOWN if leaked else err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def test_undecodable_bodies_answer_invalid_argument_without_internals_and_log_one_line(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = await stack.start_dispatcher()
    rng = random.Random(5)
    bodies = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(500)]
    bodies += [b"\x0a\x02\xc3\x28"] * 500  # worker_id holding bad UTF-8
    codes: list[grpc.StatusCode] = []
    with caplog.at_level(logging.INFO):
        async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
            for start in range(0, len(bodies), 100):
                codes += await asyncio.gather(*(_raw_register(channel, b) for b in bodies[start : start + 100]))
            stream = channel.stream_stream(SESSION, request_serializer=None, response_deserializer=None)
            for body in (b"\xff\xfe", b"\x12\x01\xff"):
                call = stream()
                await call.write(body)
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = await call.details() or ""
                assert not any(word in details for word in INTERNALS)
    undecodable = [c for c in codes if c != grpc.StatusCode.INVALID_ARGUMENT]
    # Random bytes may happen to decode: those are judged as requests, and answer a documented code.
    assert set(undecodable) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) >= 990
    lines = [r for r in caplog.records if "decode" in r.getMessage() or r.exc_info]
    assert len(lines) <= 2, [r.getMessage() for r in lines]
    assert dispatcher.servicer.undecodable.total >= 990
    worker = await stack.start_worker(dispatcher, "after-the-fuzz", worker=_honest(stack.address(dispatcher)))
    assert worker.registered.is_set()


async def test_a_flood_of_undecodable_requests_leaves_honest_tasks_p99_within_twice_a_quiet_run(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    quiet, _ = await _quiet_p99(stack, 600)
    rng = random.Random(7)
    bodies = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(100)]
    codes: list[grpc.StatusCode] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:

        async def flood() -> None:  # a hundred at a time, for as long as the honest run lasts
            while not done.is_set():
                codes.extend(await asyncio.gather(*(_raw_register(channel, b) for b in bodies)))

        attacker = asyncio.create_task(flood())
        started = loop.time()
        try:
            attacked, dead = await _quiet_p99(stack, 600)
        finally:
            done.set()
            await attacker
        rate = len(codes) / (loop.time() - started)
    print(
        f"\nhonest p99 {quiet * 1000:.0f} ms quiet, {attacked * 1000:.0f} ms beside {rate:.0f} undecodable requests/s"
    )
    assert len(codes) >= 500, "the flood went on for the whole honest run"
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}
    assert dead == 0
    assert attacked <= 2 * quiet + 0.05, (quiet, attacked)  # 50 ms for the noise of a 2-core machine


async def test_limits_answer_resource_exhausted_and_an_oversized_report_is_refused_before_it_is_applied(
    stack: Stack,
) -> None:
    dispatcher = await stack.start_dispatcher(max_sessions_per_principal=3, max_events_per_message=1000)
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        register = worker_pb2_grpc.WorkerServiceStub(channel).Register
        huge = worker_pb2.RegisterRequest(actions=[f"a{i:03d}" + "x" * 124 for i in range(256)], slots=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await register(huge)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 64 actions" in (caught.value.details() or "")

        replies = [await register(worker_pb2.RegisterRequest(actions=["work"], slots=1)) for _ in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await register(worker_pb2.RegisterRequest(actions=["work"], slots=1))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sessions per principal" in (caught.value.details() or "")

        first = replies[0]
        stream = worker_pb2_grpc.WorkerServiceStub(channel).Session
        call = stream()
        await call.write(worker_pb2.WorkerMessage(worker_id=first.worker_id, session_id=first.session_id))
        events = [
            worker_pb2.TaskEvent(task_id=f"t{i}", attempt=1, kind=worker_pb2.TaskEvent.KIND_RECEIVED)
            for i in range(10_000)
        ]
        await call.write(worker_pb2.WorkerMessage(events=events))
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 1000 events" in (await call.details() or "")
    assert dispatcher.stats.stale_reports == 0, "not one event of the refused report was applied"


async def test_a_heartbeat_flood_ends_the_stream_with_resource_exhausted(stack: Stack) -> None:
    dispatcher = await stack.start_dispatcher(heartbeat_rate=5, heartbeat_burst=10)
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        register = worker_pb2_grpc.WorkerServiceStub(channel).Register
        reply = await register(worker_pb2.RegisterRequest(actions=["work"], slots=1))

        async def flood() -> AsyncIterator[worker_pb2.WorkerMessage]:
            yield worker_pb2.WorkerMessage(worker_id=reply.worker_id, session_id=reply.session_id)
            for _ in range(10):  # the first message and 9 more take the burst of 10; the 11th is one too many
                yield worker_pb2.WorkerMessage()
            await asyncio.sleep(10)  # and nothing after it: the server ends the call long before

        call = channel.stream_stream(SESSION, request_serializer=worker_pb2.WorkerMessage.SerializeToString)(flood())
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, await call.details()
        assert "heartbeats too fast" in (await call.details() or "")


async def _quiet_p99(stack: Stack, count: int = 200) -> tuple[float, int]:
    client = await stack.client()
    loop = asyncio.get_running_loop()
    started = loop.time()
    ids = await client.submit_many([TaskSpec("work", f"{i}".encode()) for i in range(count)])
    results = await results_of(client, ids, timeout=60)
    elapsed = loop.time() - started
    dead = sum(r.status != messages_pb2.TASK_STATUS_COMPLETED for r in results)
    lat = [max(0, r.finished_at_ms - r.submitted_at_ms) / 1000 for r in results]
    return max(percentile(lat, 99), elapsed / 10), dead


async def test_oversized_registrations_from_300_sessions_do_not_slow_honest_tasks(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    quiet, _ = await _quiet_p99(stack)
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        register = worker_pb2_grpc.WorkerServiceStub(channel).Register
        actions = [f"a{i:03d}" + "x" * 124 for i in range(256)]

        async def attack() -> grpc.StatusCode:
            try:
                await register(worker_pb2.RegisterRequest(actions=actions, slots=64))
            except grpc.aio.AioRpcError as err:
                return err.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(attack() for _ in range(300)))
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        done = asyncio.Event()

        async def keep_attacking() -> None:  # 300 sessions' worth of registrations again and again
            while not done.is_set():
                codes.extend(await asyncio.gather(*(attack() for _ in range(300))))

        attacker = asyncio.create_task(keep_attacking())
        try:
            attacked, dead = await _quiet_p99(stack)
        finally:
            done.set()
            await attacker
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(codes) >= 600
    assert dead == 0
    assert len(dispatcher.sessions) == 1
    assert attacked <= 2 * quiet + 0.05, (quiet, attacked)  # 50 ms for the noise of a 2-core machine


def _principal_from_metadata(context: Any) -> str:
    """Stands in for the authenticating edge: the identity a token would name, else the peer's host."""
    named = dict(context.invocation_metadata() or ()).get("x-test-principal")
    return named or "peer:" + (context.peer() or "")


async def _never_acknowledging(channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
    """Registers, reads its stream, heartbeats, never acknowledges; registers again whenever it is dropped."""
    metadata = (("x-test-principal", "mallory"),)
    register = worker_pb2_grpc.WorkerServiceStub(channel).Register
    session = worker_pb2_grpc.WorkerServiceStub(channel).Session
    while not stop.is_set():
        try:
            reply = await register(worker_pb2.RegisterRequest(actions=["work"], slots=8), metadata=metadata)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
            continue
        call = session(metadata=metadata)

        async def read(call: Any = call) -> None:
            while await call.read() is not grpc.aio.EOF:
                pass

        reader = asyncio.create_task(read())
        try:
            await call.write(worker_pb2.WorkerMessage(worker_id=reply.worker_id, session_id=reply.session_id))
            while not stop.is_set() and not reader.done():
                await call.write(worker_pb2.WorkerMessage())
                await asyncio.sleep(0.5)
        except grpc.aio.AioRpcError:
            pass
        finally:
            reader.cancel()
            call.cancel()


async def test_thirty_sessions_that_never_acknowledge_send_no_honest_task_to_dead(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    dispatcher.servicer.principal_of = _principal_from_metadata
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    quiet, _ = await _quiet_p99(stack)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(stack.address(dispatcher)) as channel:
        attackers = [asyncio.create_task(_never_acknowledging(channel, stop)) for _ in range(30)]
        await stack.wait_workers_known(31)
        attacked, dead = await _quiet_p99(stack)
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
    print(
        f"\nhonest p99 {quiet * 1000:.0f} ms quiet, {attacked * 1000:.0f} ms beside 30 sessions that never acknowledge"
    )
    assert stack.scheduler is not None
    stalled = (
        stack.scheduler.stats.requeued[Reason.ACK_TIMEOUT.value] + stack.scheduler.stats.requeued["stream_stalled"]
    )
    assert stalled > 0, "the attackers were given tasks, and held them"
    assert dead == 0
    assert stack.scheduler.stats.dead == 0
    # On probation (they never acknowledged a task) they hold one honest task at a time.
    assert attacked <= 2 * quiet + 0.05, (quiet, attacked)  # 50 ms for the noise of a 2-core machine


async def _publish(stack: Stack, exchange: str, routing_key: str, body: bytes) -> None:
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        await target.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key)


async def _dead_reasons(stack: Stack, count: int) -> list[str]:
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    reasons: list[str] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(stack.broker.prefix + ".dead", ensure=False)
        for _ in range(200):
            message = await queue.get(fail=False)
            if message is None:
                if len(reasons) >= count:
                    break
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            raw = (message.headers or {}).get(amqp.REASON_HEADER)
            reasons.append(raw.decode() if isinstance(raw, bytes) else str(raw))
    return reasons


async def test_a_requeued_batch_with_no_tenant_or_action_goes_to_dead_and_honest_tasks_still_run(
    stack: Stack,
) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    bad = messages_pb2.AssignmentBatch(
        assignments=[messages_pb2.Assignment(task=messages_pb2.Task(task_id="sticky-1"), attempt=1, worker_id="w")]
    )
    topology = amqp.Topology(stack.broker.prefix)
    await _publish(stack, "", topology.requeue, bad.SerializeToString())
    assert await _dead_reasons(stack, 1) == ["invalid"]
    await eventually(lambda: scheduler.stats.rejected >= 1)
    _, dead = await _quiet_p99(stack, 20)
    assert dead == 0


async def test_the_same_attempt_twice_in_one_inbox_message_runs_once_and_leaks_no_slot(stack: Stack) -> None:
    dispatcher = await stack.start_dispatcher()
    worker = await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher), slots=2))
    (session,) = list(dispatcher.sessions)
    client = await stack.client()
    task = messages_pb2.Task(task_id="twice-1", tenant="default", action="work", reply_to=client.client_id)
    one = messages_pb2.Assignment(task=task, attempt=1, worker_id=session.worker_id, session_id=session.session_id)
    batch = messages_pb2.AssignmentBatch(assignments=[one, one])
    topology = amqp.Topology(stack.broker.prefix)
    await _publish(stack, topology.assign, dispatcher.id, batch.SerializeToString())
    result = await client.result("twice-1", timeout=10)
    assert result.status == messages_pb2.TASK_STATUS_COMPLETED
    await eventually(lambda: session.free_slots == session.slots + session.prefetch or session.free_slots == 2)
    assert dispatcher.stats.duplicate_assignments == 1
    await eventually(lambda: worker.stats.completed == 1)
    assert worker.stats.received == 1
    assert session.leases == {}


async def test_a_reused_task_id_gets_a_clear_rejected_result_and_the_first_task_completes(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "honest", worker=_honest(stack.address(dispatcher)))
    await stack.wait_workers_known(1)
    first, second = await stack.client(), await stack.client()
    (task_id,) = await first.submit_many([TaskSpec("work", b"mine", task_id="shared-id")])
    copy = await second.submit_many([TaskSpec("work", b"someone else's", task_id="shared-id")])
    assert copy == ["shared-id"]
    refused = await second.result("shared-id", timeout=10)
    assert refused.status == messages_pb2.TASK_STATUS_REJECTED
    assert "already used by another task" in refused.error
    done = await first.result(task_id, timeout=10)
    assert done.status == messages_pb2.TASK_STATUS_COMPLETED
    assert done.output == b"mine"
