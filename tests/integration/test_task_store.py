"""The task store against the real broker and the real PostgreSQL: migrations, the recorder, lookups."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import pytest

from sluicegate.client import Client
from sluicegate.errors import InvalidInput, SchemaBehind, StoreUnavailable, TaskPending
from sluicegate.lifecycle import K, assignment_event, task_event
from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, TaskState, TaskStore
from sluicegate.v1 import messages_pb2
from sluicegate_recorder.app import Recorder
from sluicegate_recorder.settings import RecorderSettings

from .conftest import eventually
from .store_helpers import (
    Publisher,
    declare_queue,
    execute,
    fetchval,
    lifecycle_topology,
    migrate,
    queue_depth,
    recorder,
    run_cli,
    story,
    task,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def store(store_url: str, broker: BrokerSettings) -> AsyncIterator[StoreSettings]:
    """A migrated store of this test's own, and the lifecycle topology of its prefix removed after."""
    async with lifecycle_topology(broker):
        yield await migrate(store_url)


async def _count(url: str, table: str) -> int:
    return int(await fetchval(url, f"SELECT count(*) FROM {table}"))


async def test_recorder_refuses_to_start_on_a_schema_behind_until_migrate_ran(
    store_url: str, broker: BrokerSettings
) -> None:
    async with lifecycle_topology(broker):
        with pytest.raises(SchemaBehind, match=r"version 0, this release needs 1: run `sluicegate migrate`"):
            async with recorder(StoreSettings(url=store_url), broker):
                pass
        env = {"SLUICEGATE_STORE_URL": store_url, "RABBITMQ_URL": broker.url}
        code, out, err = await run_cli("--prefix", broker.prefix, "recorder", env=env)
        assert code == 1
        assert err.strip().splitlines() == [
            "sluicegate: the task store's schema is at version 0, this release needs 1: run `sluicegate migrate`"
        ]

        code, out, err = await run_cli("--prefix", broker.prefix, "migrate", env=env)
        assert code == 0, err
        assert "schema at version 1 (applied 0001_task_records)" in out
        assert f"{broker.prefix}.lifecycle" in out
        code, out, _ = await run_cli("--prefix", broker.prefix, "migrate", env=env)
        assert (code, "up to date (version 1)" in out) == (0, True)
        assert await fetchval(store_url, "SELECT count(*) FROM sluicegate_schema") == 1
        assert await queue_depth(broker) == 0, "migrate declared the recorder's queue"

        async with recorder(StoreSettings(url=store_url), broker) as running:
            assert running.ready


async def test_emitted_events_become_one_record_per_task(store: StoreSettings, broker: BrokerSettings) -> None:
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.emit(e for n in range(200) for e in story(n))
        await eventually(lambda: running.stats.recorded == 800, timeout=20)

    async with TaskStore(store) as reader:
        record = await reader.get("task-7")
        assert record is not None
        assert record.status == TaskState.COMPLETED
        assert (record.tenant, record.action, record.attempts, record.worker_id) == ("acme", "echo", 1, "w1")
        assert record.output == b"out-7"
        assert record.payload_size == len(b"payload")
        assert [h.kind for h in record.history] == ["submitted", "assigned", "started", "completed"]
        assert record.submitted_at is not None
        assert record.first_assigned_at is not None
        assert record.started_at is not None
        assert record.finished_at is not None
        assert record.submitted_at < record.first_assigned_at < record.started_at < record.finished_at
        assert await reader.get("task-unknown") is None
        assert len(await reader.find(status="completed", limit=500)) == 200
    assert await _count(store.dsn, "sluicegate_task_events") == 800


async def test_an_at_least_once_repeat_never_changes_a_record_twice(
    store: StoreSettings, broker: BrokerSettings
) -> None:
    t = task("repeat")
    a1 = messages_pb2.Assignment(task=t, attempt=1, worker_id="w1")
    events = [
        assignment_event(K.KIND_ASSIGNED, a1, at_ms=1_700_000_000_002),
        assignment_event(K.KIND_REQUEUED, a1, reason="ack_timeout", at_ms=1_700_000_000_003),
    ]
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.publish_raw(events, copies=3)
        await eventually(lambda: running.stats.recorded + running.stats.duplicates == 6, timeout=10)
        first = await TaskStore(store).get("task-repeat")
        await publisher.publish_raw(events, copies=2)
        await eventually(lambda: running.stats.duplicates == 8, timeout=10)
    async with TaskStore(store) as reader:
        again = await reader.get("task-repeat")
    assert running.stats.recorded == 2
    assert first is not None
    assert again == first, "not even updated_at moved"
    assert again.status == TaskState.REQUEUED
    assert [(h.kind, h.reason) for h in again.history] == [("assigned", ""), ("requeued", "ack_timeout")]


async def test_events_out_of_order_end_in_the_right_state(store: StoreSettings, broker: BrokerSettings) -> None:
    t = task("late")
    a1 = messages_pb2.Assignment(task=t, attempt=1, worker_id="w1", dispatcher_id="d1")
    a2 = messages_pb2.Assignment(task=t, attempt=2, worker_id="w2", dispatcher_id="d1")
    base = 1_700_000_000_000
    events = [
        task_event(K.KIND_SUBMITTED, t, include_task=True, at_ms=base + 1),
        assignment_event(K.KIND_ASSIGNED, a1, at_ms=base + 2),
        assignment_event(K.KIND_STARTED, a1, at_ms=base + 3),
        assignment_event(K.KIND_REQUEUED, a1, reason="worker_lost", at_ms=base + 4),
        assignment_event(K.KIND_ASSIGNED, a2, at_ms=base + 5),
        assignment_event(K.KIND_STARTED, a2, at_ms=base + 6),
        assignment_event(K.KIND_FAILED, a2, error="boom", at_ms=base + 7),
    ]
    random.Random(4).shuffle(events)
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        for n, event in enumerate(events, 1):  # one message, and one transaction, each
            await publisher.publish_raw([event])
            await eventually(lambda n=n: running.stats.recorded == n, timeout=10)
    async with TaskStore(store) as reader:
        record = await reader.get("task-late")
    assert record is not None
    assert record.status == TaskState.FAILED
    assert (record.attempts, record.worker_id, record.error) == (2, "w2", "boom")
    assert record.started_at is not None
    assert int(record.started_at.timestamp() * 1000) == base + 6, "the latest attempt's start"
    assert [h.kind for h in record.history] == [
        "submitted", "assigned", "started", "requeued", "assigned", "started", "failed",
    ]  # fmt: skip
    result = record.to_result()
    assert [(h.reason, h.attempt) for h in result.history] == [("worker_lost", 1)]


async def test_a_recorder_catches_up_on_a_backlog_many_messages_per_transaction(
    store: StoreSettings, broker: BrokerSettings
) -> None:
    await declare_queue(broker)
    async with Publisher(broker) as publisher:
        for n in range(300):  # 300 messages of 4 events each, waiting in the queue
            await publisher.publish_raw(story(n))
    assert await queue_depth(broker) == 300
    async with recorder(store, broker, prefetch=100) as running:
        await eventually(lambda: running.stats.recorded == 1200, timeout=30)
        assert running.stats.transactions < 300 / 4, "messages are written many per transaction"
        await eventually(lambda: running.held == 0)
    await eventually_depth_zero(broker)


async def eventually_depth_zero(broker: BrokerSettings) -> None:
    for _ in range(100):
        if await queue_depth(broker) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the recorder did not ack what it wrote")


async def test_retention_prunes_old_records_with_their_history(store: StoreSettings, broker: BrokerSettings) -> None:
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.emit(e for n in range(20) for e in story(n))
        await eventually(lambda: running.stats.recorded == 80, timeout=10)
    old = [f"task-{n}" for n in range(10)]
    await execute(
        store.dsn, "UPDATE sluicegate_tasks SET updated_at = now() - interval '8 days' WHERE task_id = any($1)", old
    )
    async with recorder(store, broker, retention="7d", prune_interval="50ms") as running:
        await eventually(lambda: running.stats.pruned == 10, timeout=10)
    assert await _count(store.dsn, "sluicegate_tasks") == 10
    assert await _count(store.dsn, "sluicegate_task_events") == 40
    async with TaskStore(store) as reader:
        assert await reader.get("task-3") is None
        assert await reader.get("task-13") is not None


async def test_rows_the_store_refuses_are_dropped_alone(store: StoreSettings, broker: BrokerSettings) -> None:
    # An operator's rule refusing one task's rows stands in for data PostgreSQL cannot take.
    await execute(
        store.dsn,
        """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.task_id = 'task-poison' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON sluicegate_task_events
            FOR EACH ROW EXECUTE FUNCTION refuse_poison();
        """,
    )
    events = [e for n in range(8) for e in story(n)]
    events.insert(5, story("poison")[0])
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.publish_raw(events)
        await eventually(lambda: running.stats.recorded == 32 and running.stats.invalid == 1, timeout=10)
        assert running.ready
    assert await _count(store.dsn, "sluicegate_tasks") == 8


async def test_invalid_events_and_messages_are_counted_and_dropped(
    store: StoreSettings, broker: BrokerSettings
) -> None:
    bad = task_event(K.KIND_STARTED, task(1))
    bad.task_id = "not a task id"
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.publish_raw([bad, *story(1)])
        assert publisher._exchange is not None
        from sluicegate import amqp

        await amqp.publish(publisher._exchange, "lifecycle.test", b"\xff\xff not protobuf", mandatory=True)
        await eventually(lambda: running.stats.recorded == 4 and running.stats.invalid == 2, timeout=10)
    await eventually_depth_zero(broker)


async def test_lookups_from_the_cli(store: StoreSettings, broker: BrokerSettings) -> None:
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.emit(e for n in range(5) for e in story(n, action="resize", tenant="acme"))
        await publisher.emit(e for n in range(5, 8) for e in story(n, tenant="other"))
        await publisher.emit(story("pending")[:3])
        await eventually(lambda: running.stats.recorded == 35, timeout=10)

        env = {"SLUICEGATE_STORE_URL": store.dsn}
        code, out, err = await run_cli("result", "task-2", env=env)
        assert code == 0, err
        assert "status     completed (attempt 1)" in out
        assert "output     out-2 (5 bytes)" in out
        assert "history" in out

        code, out, _ = await run_cli("result", "task-2", "--json", env=env)
        data = json.loads(out)
        assert (data["status"], data["output"], data["action"]) == ("completed", "out-2", "resize")

        code, out, err = await run_cli("result", "task-pending", "--wait", "--timeout", "0.5", env=env)
        assert code == 1
        assert err.strip() == "sluicegate: task task-pending did not finish within 0.5s"
        waiting = asyncio.create_task(run_cli("result", "task-pending", "--wait", "--timeout", "20", env=env))
        await asyncio.sleep(1.0)
        await publisher.emit(story("pending")[3:])
        code, out, err = await waiting
        assert code == 0, err
        assert "status     completed" in out

        code, out, err = await run_cli("result", "task-nowhere", env=env)
        assert (code, err.strip()) == (1, "sluicegate: the task store has no record of task task-nowhere")

        code, out, _ = await run_cli("tasks", "--action", "resize", "--json", env=env)
        assert sorted(r["task_id"] for r in json.loads(out)) == [f"task-{n}" for n in range(5)]
        code, out, _ = await run_cli("tasks", "--tenant", "other", "--since", "1h", env=env)
        lines = out.strip().splitlines()
        assert lines[0].split()[:2] == ["TASK", "STATUS"]
        assert sorted(line.split()[0] for line in lines[1:]) == ["task-5", "task-6", "task-7"]
        code, out, _ = await run_cli("tasks", "--status", "running", "--limit", "1", "--json", env=env)
        assert [r["task_id"] for r in json.loads(out)] == []
        code, out, _ = await run_cli("tasks", "--limit", "2", "--json", env=env)
        assert len(json.loads(out)) == 2


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("result", "not a task id"), "a task id holds"),
        (("result", "t1", "--wait", "--timeout", "soon"), "--timeout must be a number"),
        (("tasks", "--status", "sleeping"), "--status must be one of"),
        (("tasks", "--since", "yesterday"), "--since: expected a duration"),
        (("tasks", "--limit", "0"), "limit must be between 1 and 10000"),
        (("tasks", "--action", "has space"), "action must start with a letter"),
    ],
)
async def test_bad_lookup_input_is_one_line_and_exit_2(
    args: tuple[str, ...], complaint: str, store: StoreSettings
) -> None:
    code, _, err = await run_cli(*args, env={"SLUICEGATE_STORE_URL": store.dsn})
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert complaint in err


@pytest.mark.parametrize("command", [("result", "t1"), ("tasks",), ("migrate",)])
async def test_an_unreachable_store_is_one_line_and_exit_1(command: tuple[str, ...]) -> None:
    env = {
        "SLUICEGATE_STORE_URL": "postgresql://sluicegate:s3cret@127.0.0.1:1/x",
        "SLUICEGATE_STORE_CONNECT_DEADLINE": "1s",
    }
    code, out, err = await run_cli(*command, env=env)
    assert code == 1
    assert err.strip().splitlines()[-1] == "sluicegate: cannot reach the task store"
    assert "s3cret" not in out + err


async def test_without_a_store_lookups_say_how_to_configure_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICEGATE_STORE_URL", raising=False)
    code, _, err = await run_cli("tasks", env={"SLUICEGATE_STORE_URL": ""})
    assert (code, err.strip()) == (2, "sluicegate: no task store is configured: set SLUICEGATE_STORE_URL")
    client = Client(store=StoreSettings())
    with pytest.raises(InvalidInput, match="SLUICEGATE_STORE_URL"):
        await client.get("t1")


async def test_client_lookups_without_a_running_recorder(store: StoreSettings) -> None:
    client = Client(store=store)
    assert await client.get("task-none") is None
    with pytest.raises(TaskPending):
        await client.result("task-none", wait=False)
    with pytest.raises(TimeoutError):
        await client.result("task-none", timeout=0.3)
    await client.close()
    unreachable = Client(store=StoreSettings(url="postgresql://postgres@127.0.0.1:1/x"))
    with pytest.raises(StoreUnavailable, match="cannot reach the task store"):
        await unreachable.get("t1")
    await unreachable.close()


async def test_recorder_settings_and_store_are_required() -> None:
    with pytest.raises(InvalidInput, match="SLUICEGATE_STORE_URL"):
        Recorder(RecorderSettings(), StoreSettings(), BrokerSettings())
