"""Bad input gets a clear error naming what was wrong, and never loses or corrupts a task."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import aio_pika
import grpc
import pytest

from sluicegate import amqp
from sluicegate.errors import InvalidInput
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc

from .conftest import Stack

SECRET = "s3cr3t-pw"


async def _queue_depth(stack: Stack, name: str) -> int:
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def _get_dead(stack: Stack) -> tuple[bytes, dict[str, object]]:
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(stack.broker.prefix + ".dead", ensure=False)
        for _ in range(100):
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                return message.body, dict(message.headers or {})
            await asyncio.sleep(0.05)
    raise AssertionError("nothing reached the dead queue")


@pytest.mark.parametrize(
    ("action", "payload", "options", "complaint"),
    [
        ("echo", bytes(1024 * 1024 + 1), {}, "payload is 1048577 bytes"),
        ("", b"", {}, "action must not be empty"),
        ("has space", b"", {}, "action must start with a letter"),
        ("9lives", b"", {}, "action must start with a letter"),
        ("echo", b"", {"priority": 1000}, "priority"),
        ("echo", b"", {"tenant": "bad tenant!"}, "tenant"),
        ("echo", b"", {"labels": {"bad key!": "x"}}, "label key"),
        ("echo", b"", {"timeout_s": -1.0}, "timeout"),
    ],
)
async def test_client_refuses_malformed_tasks_before_sending(
    stack: Stack, action: str, payload: bytes, options: dict[str, object], complaint: str
) -> None:
    client = await stack.client()
    with pytest.raises(InvalidInput, match=complaint):
        await client.submit(action, payload, **options)
    assert await _queue_depth(stack, stack.broker.prefix + ".tasks") == 0


async def test_scheduler_buries_undecodable_and_out_of_range_tasks(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    client = await stack.client()
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await amqp.Exchanges(amqp.Topology(stack.broker.prefix)).declare(channel)
        await amqp.publish(exchanges.tasks, exchanges.topology.tasks, b"\xff\x00 not a protobuf")
        body, headers = await _get_dead(stack)
        assert body == b"\xff\x00 not a protobuf"
        assert headers[amqp.REASON_HEADER] == "undecodable"

        bad = messages_pb2.Task(
            task_id="t-1", tenant="default", action="echo", priority=99_999, reply_to=client.client_id
        )
        await amqp.publish(
            exchanges.tasks, exchanges.topology.tasks, messages_pb2.TaskBatch(tasks=[bad]).SerializeToString()
        )
        result = await client.result("t-1", timeout=10)
    assert result.status == messages_pb2.TASK_STATUS_REJECTED
    assert "priority must be between 0 and 9" in result.error
    body, _ = await _get_dead(stack)
    assert messages_pb2.DeadLetterBatch.FromString(body).dead[0].task.task_id == "t-1"
    assert scheduler.stats.rejected == 1
    assert await _queue_depth(stack, stack.broker.prefix + ".tasks") == 0


async def test_grpc_edge_answers_bad_requests_with_status_codes(stack: Stack) -> None:
    dispatcher = await stack.start_dispatcher(max_payload_bytes=1024)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dispatcher.port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        cases = [
            (worker_pb2.RegisterRequest(actions=["echo"], slots=0), grpc.StatusCode.INVALID_ARGUMENT, "slots"),
            (worker_pb2.RegisterRequest(actions=[], slots=1), grpc.StatusCode.INVALID_ARGUMENT, "at least one action"),
            (worker_pb2.RegisterRequest(actions=["no good"], slots=1), grpc.StatusCode.INVALID_ARGUMENT, "action"),
            (worker_pb2.RegisterRequest(actions=["echo"], slots=1, worker_id="../x"), grpc.StatusCode.INVALID_ARGUMENT, "worker_id"),
            (worker_pb2.RegisterRequest(actions=["echo"], slots=1, tenant="a b"), grpc.StatusCode.INVALID_ARGUMENT, "tenant"),
            (
                worker_pb2.RegisterRequest(actions=["echo"], slots=1, action_options={"other": messages_pb2.ActionOptions(max_retries=1)}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "does not serve",
            ),
            (
                worker_pb2.RegisterRequest(actions=["echo"], slots=1, action_options={"echo": messages_pb2.ActionOptions(max_retries=1000)}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "max_retries of action 'echo'",
            ),
            (
                worker_pb2.RegisterRequest(
                    actions=["echo"], slots=1,
                    action_options={"echo": messages_pb2.ActionOptions(backoff=messages_pb2.Backoff(max_ms=10, multiplier=0.5))},
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "backoff multiplier",
            ),
        ]  # fmt: skip
        for request, code, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Register(request)
            assert caught.value.code() == code
            assert words in (caught.value.details() or "")
            assert "Traceback" not in (caught.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _session(stub, worker_pb2.WorkerMessage(worker_id="w", session_id="nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        reply = await stub.Register(worker_pb2.RegisterRequest(worker_id="w", actions=["echo"], slots=1))
        hello = worker_pb2.WorkerMessage(worker_id="w", session_id=reply.session_id)
        events = [
            worker_pb2.TaskEvent(task_id="", attempt=1, kind=worker_pb2.TaskEvent.KIND_COMPLETED),
            worker_pb2.TaskEvent(task_id="t", attempt=0, kind=worker_pb2.TaskEvent.KIND_COMPLETED),
            worker_pb2.TaskEvent(task_id="t", attempt=7, kind=worker_pb2.TaskEvent.KIND_COMPLETED),
        ]
        answer = await _session(stub, hello, worker_pb2.WorkerMessage(events=events))
        verdicts = [v.verdict for v in answer.verdicts]
        invalid, stale = worker_pb2.EventVerdict.VERDICT_INVALID, worker_pb2.EventVerdict.VERDICT_STALE
        assert verdicts == [invalid, invalid, stale], "a report for an attempt not held is rejected"

        huge = worker_pb2.TaskEvent(task_id="t", attempt=1, output=bytes(2 * 1024 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _session(stub, hello, worker_pb2.WorkerMessage(events=[huge]))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _session(stub: Any, *messages: worker_pb2.WorkerMessage) -> worker_pb2.ServerMessage:
    """Open a session stream, send `messages`, and return the first answer (or raise the stream's error)."""
    call = stub.Session()
    try:
        for message in messages:
            await call.write(message)
        async with asyncio.timeout(10):
            answer = await call.read()
        if answer is grpc.aio.EOF:
            await call.code()
            raise AssertionError("the stream ended without an answer")
        return answer  # type: ignore[no-any-return]
    finally:
        call.cancel()


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RABBITMQ_URL": f"amqp://user:{SECRET}@127.0.0.1:1/", **env},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["dispatcher", "--send-lock-timeout", "soon"], {}, "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT"),
        (
            ["dispatcher"],
            {"SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT": "-5ms"},
            "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT",
        ),
        (["dispatcher"], {"SLUICEGATE_DISPATCHER_PREFETCH": "0"}, "SLUICEGATE_DISPATCHER_PREFETCH"),
        (["scheduler", "--max-dispatch-attempts", "0"], {}, "SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS"),
        (["worker", "--slots", "0"], {}, "SLUICEGATE_WORKER_SLOTS"),
        (["worker"], {"SLUICEGATE_WORKER_LABELS": "gpu"}, "SLUICEGATE_WORKER_LABELS"),
        (["worker", "--label", "gpu"], {}, "key=value"),
        (["worker", "--label", "bad key=1"], {}, "label key"),
        (["--prefix", "Bad Prefix", "scheduler"], {}, "SLUICEGATE_PREFIX"),
        (["submit", "echo", "{not json"], {}, "payload is not valid JSON"),
        (["submit", "echo", "{}", "--count", "0"], {}, "--count"),
    ],
)
def test_cli_rejects_bad_settings_in_one_line_without_secrets(args: list[str], env: dict[str, str], named: str) -> None:
    done = _cli(*args, **env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sluicegate: ")
    assert named in lines[0]
    assert SECRET not in done.stderr + done.stdout


def test_cli_reports_an_unreachable_broker_in_one_line_without_secrets() -> None:
    done = _cli("submit", "echo", "{}", SLUICEGATE_CONNECT_DEADLINE="1s")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "sluicegate: cannot reach the broker"
    assert SECRET not in done.stderr + done.stdout
