"""Task records end to end: tasks run through the real pipeline are found from another client, by id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sluicegate.client import Client
from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, TaskRecord, TaskState
from sluicegate.v1 import messages_pb2

from .conftest import Stack, eventually
from .store_helpers import migrate, recorder, run_cli

pytestmark = pytest.mark.timeout(90)

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


@pytest.fixture
async def store(store_url: str) -> StoreSettings:
    return await migrate(store_url)


@pytest.fixture
async def recording(store: StoreSettings, broker: BrokerSettings) -> AsyncIterator[None]:
    async with recorder(store, broker):
        yield


async def _finished_record(client: Client, task_id: str) -> TaskRecord:
    found: list[TaskRecord] = []

    async def check() -> bool:
        record = await client.get(task_id)
        if record is not None and record.terminal:
            found.append(record)
        return bool(found)

    for _ in range(200):
        if await check():
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} has no terminal record")


async def test_a_task_run_here_is_found_from_another_client(
    stack: Stack, store: StoreSettings, recording: None
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)
    producer = await stack.client()

    ok = await producer.submit("echo", {"hello": "world"})
    bad = await producer.submit("fail", b"", max_retries=0)
    assert (await producer.result(ok, timeout=20)).status == COMPLETED
    assert (await producer.result(bad, timeout=20)).status == messages_pb2.TASK_STATUS_FAILED

    other = Client(stack.broker, store=store)  # another process would do the same; it submits nothing
    try:
        record = await _finished_record(other, ok)
        assert record.status == TaskState.COMPLETED
        assert (record.action, record.tenant, record.worker_id) == ("echo", "default", "w1")
        assert record.dispatcher_id == dispatcher.id
        assert record.attempts == 1
        assert record.output == b'{"hello": "world"}'
        kinds = [h.kind for h in record.history]
        assert {"started", "completed"} <= set(kinds), kinds
        assert kinds.index("started") < kinds.index("completed")
        assert record.started_at is not None
        assert record.finished_at is not None
        assert record.started_at <= record.finished_at

        failed = await _finished_record(other, bad)
        assert failed.status == TaskState.FAILED
        assert "failed on purpose" in failed.error

        result = await other.result(ok, timeout=5)  # not submitted by `other`: from the store
        assert (result.status, result.output, result.worker_id) == (COMPLETED, b'{"hello": "world"}', "w1")
    finally:
        await other.close()
    await eventually(lambda: dispatcher.lifecycle.published >= 4 and dispatcher.lifecycle.buffered == 0)


async def test_a_result_is_found_after_the_submitting_client_is_gone(
    stack: Stack, store: StoreSettings, recording: None
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)

    async with Client(stack.broker, store=store) as gone:  # like `sluicegate submit --no-wait`
        task_id = await gone.submit("sleep", {"seconds": 0.5})

    restarted = Client(stack.broker, store=store)
    try:
        result = await restarted.result(task_id, timeout=20)  # waits for the terminal record
    finally:
        await restarted.close()
    assert result.status == COMPLETED
    assert result.output == b'{"seconds": 0.5}'
    await eventually(lambda: dispatcher.stats.results_unclaimed == 1)


async def test_without_a_store_the_pipeline_works_as_before(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)
    client = Client(stack.broker, store=StoreSettings())
    async with client:
        outputs = await asyncio.gather(*(client.run("echo", f"x{n}") for n in range(20)))
    assert outputs == [f"x{n}".encode() for n in range(20)]
    # No recorder's queue is bound: the first batch comes back unroutable, and events stop being built.
    await eventually(lambda: dispatcher.lifecycle.unrecorded > 0, timeout=5)
    assert dispatcher.lifecycle.published == 0
    assert not dispatcher.lifecycle.wanted


async def test_an_operator_cancels_a_running_task_from_the_cli(
    stack: Stack, store: StoreSettings, recording: None
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w1")
    await stack.wait_workers_known(1)
    client = await stack.client()
    long = await client.submit("sleep", {"seconds": 60})
    done = await client.submit("echo", "quick")
    assert (await client.result(done, timeout=20)).status == COMPLETED
    await eventually(lambda: dispatcher.sessions.leases == 1)  # the long one runs
    env = {"SLUICEGATE_STORE_URL": store.dsn, "RABBITMQ_URL": stack.broker.url}  # a container's, maybe
    cli = ("--prefix", stack.broker.prefix, "cancel")

    code, out, err = await run_cli(*cli, long, "--wait", "--reason", "operator says stop", env=env)
    assert code == 0, err
    assert out.strip() == f"task {long} cancelled: operator says stop"
    result = await client.result(long, timeout=10)
    assert result.status == messages_pb2.TASK_STATUS_CANCELLED
    await eventually(lambda: dispatcher.sessions.leases == 0)  # its slot is free again

    code, _, err = await run_cli(*cli, done, "--wait", "--timeout", "10", env=env)
    assert code == 1
    assert err.strip() == f"sluicegate: task {done} had already ended: completed"

    code, out, _ = await run_cli(*cli, "nobody-knows-this-one", env=env)  # recorded, not waited for
    assert code == 0
    assert "recorded" in out


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("cancel", "not a task id"), "a task id holds"),
        (("cancel", "t1", "--wait"), "--wait needs the task store"),
        (("cancel", "t1", "--wait", "--timeout", "-1"), "--timeout must be more than zero"),
    ],
)
async def test_bad_cancel_input_is_one_line_and_exit_2(args: tuple[str, ...], complaint: str) -> None:
    code, _, err = await run_cli(*args, env={"SLUICEGATE_STORE_URL": ""})
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert complaint in err
