"""A store or recorder that goes away loses nothing: events wait in their queue and the recorder catches up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, TaskState, TaskStore

from .conftest import eventually
from .store_helpers import Publisher, declare_queue, fetchval, lifecycle_topology, migrate, queue_depth, recorder, story

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def store(store_url: str, broker: BrokerSettings) -> AsyncIterator[StoreSettings]:
    async with lifecycle_topology(broker):
        yield await migrate(store_url)


async def _counts(url: str) -> tuple[int, int, int]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM sluicegate_tasks) AS tasks,"
            " (SELECT count(*) FROM sluicegate_tasks WHERE status = 'completed' AND attempts = 1) AS completed,"
            " (SELECT count(*) FROM sluicegate_task_events) AS events"
        )
        assert row is not None
        return row["tasks"], row["completed"], row["events"]
    finally:
        await connection.close()


async def test_a_store_dropped_and_recreated_mid_run_gets_every_event_after_it_is_back(
    store: StoreSettings, broker: BrokerSettings, postgres_url: str
) -> None:
    name = store.dsn.rsplit("/", 1)[1]
    async with recorder(store, broker) as running, Publisher(broker) as publisher:
        await publisher.emit(e for n in range(100) for e in story(f"before-{n}"))
        await eventually(lambda: running.stats.recorded == 400, timeout=20)
        assert running.ready

        lookup = TaskStore(store)
        assert await lookup.get("task-after-7") is None
        waiting = asyncio.create_task(lookup.wait("task-after-7", timeout=60))  # a lookup across the outage
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await publisher.emit(e for n in range(100) for e in story(f"after-{n}"))
            await eventually(lambda: not running.ready, timeout=20)
            await asyncio.sleep(1.0)  # the recorder keeps retrying against a store that is gone
            assert running.stats.recorded == 400
            assert running.stats.store_errors > 0
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await asyncio.sleep(0.5)  # and against an empty database, before it is migrated
        await migrate(store.dsn)
        await eventually(lambda: running.stats.recorded == 800, timeout=30)
        assert running.ready
        waited = await waiting
        await lookup.close()
        assert (waited.status, waited.output) == (TaskState.COMPLETED, b"out-after-7")

    assert await _counts(store.dsn) == (100, 100, 400), "every event published while the store was gone"
    async with TaskStore(store) as reader:
        record = await reader.get("task-after-42")
        assert record is not None
        assert record.status == TaskState.COMPLETED
        assert record.output == b"out-after-42"


async def test_a_killed_recorder_loses_nothing_and_applies_nothing_twice(
    store: StoreSettings, broker: BrokerSettings
) -> None:
    await declare_queue(broker)
    env = {
        **os.environ,
        "SLUICEGATE_STORE_URL": store.dsn,
        "RABBITMQ_URL": broker.url,
        "SLUICEGATE_PREFIX": broker.prefix,
        "SLUICEGATE_RECORDER_PREFETCH": "8",
        "SLUICEGATE_RECORDER_MAX_BATCH_EVENTS": "200",
    }

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluicegate", "recorder", env=env, stderr=asyncio.subprocess.DEVNULL
        )

    tasks = 3000
    first = await start()
    try:
        async with Publisher(broker) as publisher:
            for chunk in range(0, tasks, 100):  # a steady stream, 100 tasks (400 events) at a time
                await publisher.emit(e for n in range(chunk, chunk + 100) for e in story(n))
                if chunk == 1200:
                    await eventually_recorded(store.dsn, 1)
                    first.send_signal(signal.SIGKILL)  # mid-run, with messages in hand
                    await first.wait()
                    recorded_when_killed = int(await fetchval(store.dsn, "SELECT count(*) FROM sluicegate_task_events"))
        assert 0 < recorded_when_killed < tasks * 4
        assert await queue_depth(broker) > 0, "events wait in the queue while no recorder runs"
        second = await start()
        try:
            for _ in range(600):
                if (await _counts(store.dsn))[2] == tasks * 4:
                    break
                await asyncio.sleep(0.1)
            assert await _counts(store.dsn) == (tasks, tasks, tasks * 4)
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 20) == 0, "a recorder stops cleanly on SIGTERM"
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert await queue_depth(broker) == 0


async def eventually_recorded(url: str, events: int) -> None:
    for _ in range(300):
        if int(await fetchval(url, "SELECT count(*) FROM sluicegate_task_events")) >= events:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the recorder recorded nothing")


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    return int(response.split()[1]), response.split("\r\n\r\n", 1)[1]


async def test_recorder_readiness_follows_the_store_and_metrics_tell_why(
    store: StoreSettings, broker: BrokerSettings, postgres_url: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "SLUICEGATE_STORE_URL": store.dsn,
        "RABBITMQ_URL": broker.url,
        "SLUICEGATE_PREFIX": broker.prefix,
        "SLUICEGATE_METRICS_PORT": str(port),
        "SLUICEGATE_METRICS_HOST": "127.0.0.1",
        "SLUICEGATE_RECORDER_RETRY_MAX_BACKOFF": "200ms",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluicegate", "recorder", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    name = store.dsn.rsplit("/", 1)[1]
    try:
        await _until(lambda: _get(port, "/readyz"), 200)
        async with Publisher(broker) as publisher:
            await publisher.emit(story(1))
            await _until(
                lambda: _get(port, "/metrics"), 200, 'sluicegate_recorder_events_total{outcome="recorded"} 4.0'
            )
            admin = await asyncpg.connect(postgres_url)
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                await publisher.emit(story(2))
                await _until(lambda: _get(port, "/readyz"), 503)
                _, metrics = await _get(port, "/metrics")
                assert "sluicegate_recorder_store_up 0.0" in metrics
                assert (await _get(port, "/healthz"))[0] == 200, "alive while it waits for the store"
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            await migrate(store.dsn)
            await _until(lambda: _get(port, "/readyz"), 200)
            await _until(
                lambda: _get(port, "/metrics"), 200, 'sluicegate_recorder_events_total{outcome="recorded"} 8.0'
            )
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _until(get: Callable[[], Awaitable[tuple[int, str]]], status: int, text: str = "") -> None:
    for _ in range(300):
        try:
            got, body = await get()
        except OSError:
            got, body = 0, ""
        if got == status and text in body:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never got {status} {text!r}")
