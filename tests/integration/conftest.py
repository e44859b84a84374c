"""Integration fixtures: a real RabbitMQ (testcontainers with Docker, else RABBITMQ_URL), a unique prefix per
test, and a PostgreSQL server on which each test that needs a task store gets a database of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from sluicegate import amqp
from sluicegate.cli import demo_worker
from sluicegate.client import Client
from sluicegate.settings import BrokerSettings
from sluicegate.worker import Worker
from sluicegate_dispatcher.app import Dispatcher
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.app import Scheduler
from sluicegate_scheduler.settings import SchedulerSettings

from .helpers import SchedulerProcess

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A broker for the session: RABBITMQ_URL when set or when Docker is absent, else a container."""
    if os.environ.get("RABBITMQ_URL") or not _docker_available():
        yield os.environ.get("RABBITMQ_URL", DEFAULT_URL)
        return
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server for the session: SLUICEGATE_TEST_POSTGRES_URL, by default the local one.

    The URL names a database the tests may connect to as a user allowed to create databases.
    """
    return os.environ.get("SLUICEGATE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url` (same user, host and options)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def store_url(postgres_url: str) -> AsyncIterator[str]:
    """A database of this test's own, created empty (no schema) and dropped afterwards."""
    name = f"sluicegate_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(postgres_url, name)
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def broker(rabbitmq_url: str) -> BrokerSettings:
    return BrokerSettings(rabbitmq_url=rabbitmq_url, prefix=f"t-{uuid.uuid4().hex[:10]}")


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until `predicate()` is truthy; fail with a clear message after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(interval)


class Stack:
    """A scheduler, dispatchers, workers and a client on one prefix; everything torn down after the test."""

    def __init__(self, broker: BrokerSettings, exit_stack: contextlib.AsyncExitStack) -> None:
        self.broker = broker
        self._stack = exit_stack
        self.dispatchers: list[Dispatcher] = []
        self.dispatchers_ids: list[str] = []  # inboxes of dispatchers run outside this process
        self.scheduler: Scheduler | None = None

    async def start_scheduler(self, **settings: Any) -> Scheduler:
        self.scheduler = await self._stack.enter_async_context(Scheduler(SchedulerSettings(**settings), self.broker))
        return self.scheduler

    async def start_dispatcher(self, **settings: Any) -> Dispatcher:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("drain_grace", "100ms")
        dispatcher = Dispatcher(DispatcherSettings(**settings), self.broker)
        self.dispatchers.append(dispatcher)
        return await self._stack.enter_async_context(dispatcher)

    async def start_worker(
        self, dispatcher: Dispatcher, worker_id: str, *, slots: int = 8, worker: Worker | None = None
    ) -> Worker:
        worker = worker or demo_worker(f"127.0.0.1:{dispatcher.port}", slots, worker_id)
        await self._stack.enter_async_context(worker)
        await asyncio.wait_for(worker.registered.wait(), 10)
        return worker

    @staticmethod
    def address(dispatcher: Dispatcher) -> str:
        return f"127.0.0.1:{dispatcher.port}"

    async def spawn_scheduler(self, **settings: str) -> SchedulerProcess:
        """A scheduler in a process of its own (stopped at the end of the test)."""
        process = SchedulerProcess(self.broker, settings)
        self._stack.push_async_callback(process.stop)
        return await process.start()

    async def client(self) -> Client:
        return await self._stack.enter_async_context(Client(self.broker))

    async def wait_workers_known(self, count: int) -> None:
        assert self.scheduler is not None
        scheduler = self.scheduler
        await eventually(lambda: sum(w.ready for w in scheduler.pool) >= count, timeout=10)


@contextlib.asynccontextmanager
async def stack_on(broker: BrokerSettings) -> AsyncIterator[Stack]:
    """A Stack on `broker`'s prefix; on exit everything is closed and every queue and exchange deleted."""
    async with contextlib.AsyncExitStack() as exit_stack:
        s = Stack(broker, exit_stack)
        try:
            yield s
        finally:
            await exit_stack.aclose()
            connection = await aio_pika.connect_robust(broker.rabbitmq_url.get_secret_value())
            async with connection:
                dispatcher_ids = [d.id for d in s.dispatchers] + s.dispatchers_ids
                await amqp.delete_topology(connection, amqp.Topology(broker.prefix), dispatcher_ids)


@pytest.fixture
async def stack(broker: BrokerSettings) -> AsyncIterator[Stack]:
    async with stack_on(broker) as s:
        yield s


@pytest.fixture
async def twin(broker: BrokerSettings) -> AsyncIterator[Stack]:
    """A second, independent stack beside `stack` (its own prefix), for runs that compare side by side."""
    async with stack_on(broker.model_copy(update={"prefix": f"{broker.prefix}-twin"})) as s:
        yield s
