"""Integration fixtures: a real RabbitMQ (testcontainers with Docker, else RABBITMQ_URL), a unique prefix per
test, and a PostgreSQL server on which each test that needs a task store gets a database of its own."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluicegate import amqp
from sluicegate.cli import demo_worker
from sluicegate.client import Client, TaskResult, TaskSpec
from sluicegate.settings import BrokerSettings
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker
from sluicegate_dispatcher.app import Dispatcher
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.app import Scheduler
from sluicegate_scheduler.settings import SchedulerSettings

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


def percentile(values: Iterable[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value at least `p` percent of the values are at or below."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Start:
    task_id: str
    attempt: int
    worker_id: str
    at_ms: int  # wall clock, comparable with Task.submitted_at_ms
    group: str


class Recorder:
    """Handlers that note when and where each task starts and how many run at once, per group.

    A task's group is its payload (decoded), so a test can say which key a task carries. Handlers
    hold their slot for `hold` seconds, and until `gate` is set.
    """

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.gate = asyncio.Event()
        self.gate.set()
        self.starts: list[Start] = []
        self.finished: list[str] = []
        self.running: Counter[str] = Counter()  # by group
        self.peak: Counter[str] = Counter()
        self.by_worker: Counter[tuple[str, str]] = Counter()  # running now, by (worker id, group)

    def worker(
        self,
        address: str,
        worker_id: str,
        actions: Iterable[str] = ("work",),
        *,
        slots: int = 8,
        tenant: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> Worker:
        worker = Worker(address, slots=slots, worker_id=worker_id, tenant=tenant, labels=labels)
        for action in actions:
            worker.register(action, self._handle)
        return worker

    async def _handle(self, ctx: TaskContext) -> bytes:
        group = ctx.payload.decode(errors="replace")[:64]
        self.starts.append(Start(ctx.task_id, ctx.attempt, ctx.worker_id, now_ms(), group))
        self.running[group] += 1
        self.peak[group] = max(self.peak[group], self.running[group])
        self.by_worker[(ctx.worker_id, group)] += 1
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            await self.gate.wait()
        finally:
            self.running[group] -= 1
            self.by_worker[(ctx.worker_id, group)] -= 1
        self.finished.append(ctx.task_id)
        return b""

    def first_start(self) -> dict[str, Start]:
        """Each task's first start."""
        first: dict[str, Start] = {}
        for start in self.starts:
            first.setdefault(start.task_id, start)
        return first

    def order(self, ids: Iterable[str] | None = None) -> list[str]:
        """Task ids in the order their handlers first started (only `ids`, when given)."""
        wanted = None if ids is None else set(ids)
        return [t for t in self.first_start() if wanted is None or t in wanted]

    def waits_ms(self, results: Iterable[TaskResult]) -> list[int]:
        """Submit to first start of each task, in ms (from the submission time the task carries)."""
        first = self.first_start()
        return [first[r.task_id].at_ms - r.submitted_at_ms for r in results]


async def results_of(client: Client, ids: Iterable[str], timeout: float) -> list[TaskResult]:
    """Every result, in the order of `ids`; fails after `timeout` seconds."""
    return await asyncio.wait_for(asyncio.gather(*(client.result(i) for i in ids)), timeout)


async def submit_steadily(client: Client, specs: Iterable[TaskSpec], rate: float) -> list[str]:
    """Submit one task per message at `rate` a second, on a fixed schedule (a slow confirm does not slow it)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent: list[asyncio.Task[list[str]]] = []
    for index, spec in enumerate(specs):
        await asyncio.sleep(max(0.0, start + index / rate - loop.time()))
        sent.append(asyncio.create_task(client.submit_many([spec])))
    return [task_id for ids in await asyncio.gather(*sent) for task_id in ids]


async def flood(broker: BrokerSettings, count: int, tenant: str, action: str = "work", fairness_key: str = "") -> float:
    """Submit `count` tasks one per message from a producer process of its own; returns the seconds it took."""
    env = {**os.environ, "RABBITMQ_URL": broker.url, "SLUICEGATE_PREFIX": broker.prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("flood.py")), str(count), tenant, action, fairness_key,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    return float(out)


async def kill_worker(worker: Worker) -> None:
    """End a worker abruptly: its stream and handlers stop at once, with no report and no grace."""
    runner = worker._runner  # the test's own fault injection; no public API kills a worker
    assert runner is not None
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class SchedulerProcess:
    """A scheduler run as `sluicegate scheduler` in a process of its own, seen through its metrics port."""

    def __init__(self, broker: BrokerSettings, settings: dict[str, str]) -> None:
        self.broker = broker
        self.port = free_port()
        self.env = {
            **os.environ,
            "RABBITMQ_URL": broker.url,
            "SLUICEGATE_PREFIX": broker.prefix,
            "SLUICEGATE_METRICS_PORT": str(self.port),
            "SLUICEGATE_METRICS_HOST": "127.0.0.1",
            **{f"SLUICEGATE_SCHEDULER_{name.upper()}": value for name, value in settings.items()},
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> SchedulerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluicegate", "--log-level", "WARNING", "scheduler",
            env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        ready: list[int] = []

        async def is_ready() -> bool:
            ready.append((await asyncio.to_thread(scrape, self.port, "/readyz"))[0])
            return ready[-1] == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await is_ready():
            assert self.process.returncode is None, "the scheduler process ended"
            assert loop.time() < deadline, "the scheduler process never became ready"
            await asyncio.sleep(0.1)
        return self

    async def metrics(self) -> Samples:
        status, text = await asyncio.to_thread(scrape, self.port)
        assert status == 200, text
        return samples(text)

    async def value(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def until(self, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
        """Scrape until `check` holds for the samples; returns them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check(found := await self.metrics()):
            if loop.time() > deadline:
                raise AssertionError(f"scheduler metrics not as expected within {timeout}s")
            await asyncio.sleep(0.05)
        return found

    async def wait_workers_known(self, count: int) -> None:
        await self.until(lambda m: m.get(("sluicegate_known_workers", ()), 0) >= count)

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Resident memory now (VmRSS) or at its peak (VmHWM), in kB."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for the scheduler process")

    def cpu_seconds(self) -> float:
        """User and system CPU time the scheduler process has used."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


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
