"""Integration fixtures: a real RabbitMQ and PostgreSQL (testcontainers with Docker, else this machine's), a unique prefix per test.

Which broker: RABBITMQ_URL when it is set; otherwise, when a Docker engine answers, a container
started by testcontainers from SLUICEGATE_TEST_RABBITMQ_IMAGE (default: the official image);
otherwise the broker at amqp://guest:guest@127.0.0.1:5672/. PostgreSQL the same way, from
SLUICEGATE_TEST_POSTGRES_IMAGE, else postgresql://postgres@127.0.0.1:5432/postgres. An image
variable set to `none` means no container. An image named explicitly must be usable (the run fails
otherwise); the official default is used only if it is there or can be pulled, so a machine that
reaches no registry falls back to its own services. `make test-containers` builds the images
from Debian (scripts/containers.py) and runs this suite against them.
"""

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
RABBITMQ_IMAGE = ("SLUICEGATE_TEST_RABBITMQ_IMAGE", "rabbitmq:3.13-management")
POSTGRES_IMAGE = ("SLUICEGATE_TEST_POSTGRES_IMAGE", "postgres:15")

# What the session ran against, for the summary at the end of the run.
SERVICES: dict[str, str] = {}


def _docker_client() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:
        return None
    return client


def container_image(setting: tuple[str, str]) -> str | None:
    """The image to start a container from, or None to use this machine's service instead."""
    variable, default = setting
    image = os.environ.get(variable, "") or default
    if image == "none":
        return None
    explicit = variable in os.environ
    client = _docker_client()
    if client is None:
        if explicit:
            pytest.fail(f"{variable}={image}, but no Docker engine answers")
        return None
    try:
        client.images.get(image)
    except Exception:
        try:
            client.images.pull(image)
        except Exception as err:
            if explicit:
                pytest.fail(f"{variable}={image}: no such image here and it cannot be pulled ({err})")
            return None  # no registry: the machine's own service
    return image


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, where in SERVICES.items():
        terminalreporter.write_line(f"integration tests used {what}: {where}")


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A broker for the session: RABBITMQ_URL when set, else a container when Docker has the image, else local."""
    image = None if os.environ.get("RABBITMQ_URL") else container_image(RABBITMQ_IMAGE)
    if image is None:
        url = os.environ.get("RABBITMQ_URL", DEFAULT_URL)
        SERVICES["RabbitMQ"] = f"{url.rsplit('@', 1)[-1]} (RABBITMQ_URL or the default)"
        yield url
        return
    from testcontainers.community.rabbitmq import RabbitMqContainer

    with RabbitMqContainer(image) as container:
        params = container.get_connection_params()
        SERVICES["RabbitMQ"] = f"a container of {image} at {params.host}:{params.port} (testcontainers)"
        url = f"amqp://guest:guest@{params.host}:{params.port}/"
        # The `sluicegate` commands tests run as subprocesses read RABBITMQ_URL: the container's, too.
        os.environ["RABBITMQ_URL"] = url
        try:
            yield url
        finally:
            del os.environ["RABBITMQ_URL"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: a container when Docker has the image, else the local one.

    The URL names a database every test may create its own databases from (and must drop them).
    """
    image = container_image(POSTGRES_IMAGE)
    if image is None:
        url = os.environ.get("SLUICEGATE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
        SERVICES["PostgreSQL"] = f"{url.rsplit('@', 1)[-1]} (SLUICEGATE_TEST_POSTGRES_URL or the default)"
        yield url
        return
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer(image, username="postgres", password="sluicegate", dbname="postgres", driver=None) as pg:
        url = pg.get_connection_url()
        SERVICES["PostgreSQL"] = f"a container of {image} at {url.rsplit('@', 1)[-1]} (testcontainers)"
        yield url


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
                await amqp.delete_topology(
                    connection, amqp.Topology(broker.prefix), dispatcher_ids, partitions=broker.partitions
                )


@pytest.fixture
async def stack(broker: BrokerSettings) -> AsyncIterator[Stack]:
    async with stack_on(broker) as s:
        yield s


@pytest.fixture
async def twin(broker: BrokerSettings) -> AsyncIterator[Stack]:
    """A second, independent stack beside `stack` (its own prefix), for runs that compare side by side."""
    async with stack_on(broker.model_copy(update={"prefix": f"{broker.prefix}-twin"})) as s:
        yield s
