"""The scenario framework: a steady load, the parts of a stack (in-process or as subprocesses), faults, and teardown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluicegate import amqp
from sluicegate.client import Client, TaskSpec
from sluicegate.errors import PermanentError
from sluicegate.settings import BrokerSettings
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker, WorkerSettings
from sluicegate_dispatcher.app import Dispatcher
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.app import Scheduler
from sluicegate_scheduler.settings import SchedulerSettings

from .ledger import Ledger, Summary
from .observer import Observer

SpecFor = Callable[[int], TaskSpec]


async def eventually(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str | Callable[[], str] = ""
) -> None:
    """Poll until `predicate()` is truthy; fail naming the condition after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            text = what() if callable(what) else what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"not within {timeout}s: {text}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process, from /proc."""
    path = f"/proc/{pid or 'self'}/status"
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True, slots=True)
class Size:
    """How hard a scenario pushes: a steady rate for a number of tasks."""

    name: str
    rate: float
    tasks: int

    @property
    def seconds(self) -> float:
        return self.tasks / self.rate


def echo_spec(i: int) -> TaskSpec:
    return TaskSpec("echo", f"task-{i}".encode(), task_id=uuid.uuid4().hex)


def sleep_spec(seconds: float) -> SpecFor:
    def spec(i: int) -> TaskSpec:
        return TaskSpec("sleep", {"seconds": seconds, "i": i}, task_id=uuid.uuid4().hex)

    return spec


class LoadGenerator:
    """Open-loop load: submits `rate` tasks a second whatever happens downstream, until `total`."""

    def __init__(
        self, client: Client, ledger: Ledger, rate: float, total: int, spec_for: SpecFor, tick: float = 0.05
    ) -> None:
        self.client, self.ledger = client, ledger
        self.rate, self.total, self.spec_for, self.tick = rate, total, spec_for, tick
        self.sent = 0
        self.started_at = 0.0
        self.done = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.errors: list[BaseException] = []

    def start(self) -> LoadGenerator:
        self._runner = asyncio.create_task(self._run(), name="chaos-load")
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        while self.sent < self.total:
            due = min(self.total, int((loop.time() - self.started_at) * self.rate) + 1)
            if due > self.sent:
                specs = [self.spec_for(i) for i in range(self.sent, due)]
                self.ledger.on_submit([s.task_id for s in specs])
                task = asyncio.create_task(self._submit(specs))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                self.sent = due
            await asyncio.sleep(self.tick)
        self.done.set()

    async def _submit(self, specs: list[TaskSpec]) -> None:
        try:
            ids = await self.client.submit_many(specs)
        except Exception as err:  # an unroutable tasks queue, say: recorded, never silent
            self.errors.append(err)
            return
        self.ledger.on_confirm(ids)

    async def wait_submitted(self, timeout: float) -> None:
        """Until every task was issued and every submit confirmed (or failed)."""
        await asyncio.wait_for(self.done.wait(), timeout)
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=timeout)

    async def stop(self) -> None:
        for task in [self._runner, *self._inflight]:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*[t for t in [self._runner, *self._inflight] if t], return_exceptions=True)


class Proc:
    """A `python -m sluicegate ...` subprocess with its log file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name, self.process, self.log_path = name, process, log_path
        self.stopped_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.process.wait(), timeout)
        return None

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
        await self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Scenario:
    """One run: a unique prefix on a broker, a ledger and its observer, and everything started for it."""

    def __init__(self, name: str, size: Size, url: str, registry: list[Summary] | None = None) -> None:
        self.name, self.size, self.url = name, size, url
        self.prefix = f"chaos-{name[:16]}-{uuid.uuid4().hex[:8]}".lower()
        self.broker = BrokerSettings(rabbitmq_url=url, prefix=self.prefix)
        self.topology = amqp.Topology(self.prefix)
        self.ledger = Ledger()
        self.observer = Observer(url, self.topology, self.ledger)
        self.registry = registry
        self.dispatchers: list[Dispatcher] = []
        self.schedulers: list[Scheduler] = []
        self.workers: list[Worker] = []
        self.clients: list[Client] = []
        self.procs: list[Proc] = []
        self.inbox_ids: list[str] = []
        self.loads: list[LoadGenerator] = []
        self.logdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.started_at = time.monotonic()
        self.summary: Summary | None = None

    async def __aenter__(self) -> Scenario:
        await self.observer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
        if exc[0] is not None:
            for proc in self.procs:
                print(f"--- log of {proc.name} ({proc.log_path}) ---\n{proc.log_tail()}", file=sys.stderr)

    async def close(self) -> None:
        """Tear down in reverse: load, workers, subprocesses, services, observer, then the topology."""
        for load in self.loads:
            await load.stop()
        await asyncio.gather(*(_quietly(w.stop()) for w in self.workers))
        await asyncio.gather(*(_quietly(p.kill()) for p in self.procs))
        for client in self.clients:
            await _quietly(client.close())
        await asyncio.gather(*(_quietly(d.close()) for d in self.dispatchers))
        await asyncio.gather(*(_quietly(s.close()) for s in self.schedulers))
        await _quietly(self.observer.close())
        await _quietly(self.delete_topology())

    async def delete_topology(self) -> None:
        connection = await amqp.connect(self.url, deadline=20)
        async with connection:
            ids = self.inbox_ids + [d.id for d in self.dispatchers]
            await amqp.delete_topology(connection, self.topology, ids)
            await self.observer.delete(connection)

    # The parts, in-process.

    def _broker_via(self, url: str | None) -> BrokerSettings:
        return self.broker if url is None else BrokerSettings(rabbitmq_url=url, prefix=self.prefix)

    async def start_scheduler(self, *, url: str | None = None, **settings: Any) -> Scheduler:
        scheduler = Scheduler(SchedulerSettings(**settings), self._broker_via(url))
        self.schedulers.append(scheduler)
        await scheduler.start()
        return scheduler

    async def start_dispatcher(self, *, url: str | None = None, **settings: Any) -> Dispatcher:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("id", f"d{len(self.dispatchers) + 1}-{uuid.uuid4().hex[:6]}")
        dispatcher = Dispatcher(DispatcherSettings(**settings), self._broker_via(url))
        self.dispatchers.append(dispatcher)
        await dispatcher.start()
        return dispatcher

    async def start_worker(
        self,
        addresses: str | Sequence[str],
        worker_id: str,
        *,
        slots: int = 8,
        wait: bool = True,
        actions: Sequence[str] = (),
        **settings: Any,
    ) -> Worker:
        settings.setdefault("shutdown_grace", "1s")  # teardown need not wait for handlers
        worker = instrumented_worker(addresses, worker_id, slots, self.ledger, WorkerSettings(**settings), actions)
        self.workers.append(worker)
        await worker.__aenter__()
        if wait:
            await asyncio.wait_for(worker.registered.wait(), 15)
        return worker

    async def client(self) -> Client:
        client = Client(self.broker)
        self.clients.append(client)
        await client.connect()
        return client

    def load(self, client: Client, spec_for: SpecFor = echo_spec, *, rate: float = 0, total: int = 0) -> LoadGenerator:
        load = LoadGenerator(client, self.ledger, rate or self.size.rate, total or self.size.tasks, spec_for)
        self.loads.append(load)
        return load.start()

    # The parts, as subprocesses (`python -m sluicegate ...`).

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
        env.update(
            RABBITMQ_URL=self.url,
            SLUICEGATE_PREFIX=self.prefix,
            SLUICEGATE_LOG_LEVEL=os.environ.get("SLUICEGATE_CHAOS_LOG_LEVEL", "WARNING"),
        )
        env.update(overrides)
        return env

    async def spawn(self, name: str, *args: str, **env: str) -> Proc:
        log_path = self.logdir / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluicegate", *args, env=self.env(**env), stdout=log_file, stderr=log_file
        )
        log_file.close()
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    async def spawn_dispatcher(self, dispatcher_id: str, port: int, **env: str) -> Proc:
        self.inbox_ids.append(dispatcher_id)
        proc = await self.spawn(
            f"dispatcher-{dispatcher_id}", "dispatcher", "--listen", f"127.0.0.1:{port}", "--id", dispatcher_id, **env
        )
        await wait_serving(port, proc, timeout=20)
        return proc

    async def spawn_scheduler(self, name: str, **env: str) -> Proc:
        return await self.spawn(name, "scheduler", **env)

    async def spawn_worker(self, worker_id: str, addresses: str, slots: int, **env: str) -> Proc:
        return await self.spawn(
            f"worker-{worker_id}",
            "worker", "--dispatchers", addresses, "--worker-id", worker_id, "--slots", str(slots),
            **env,
        )  # fmt: skip

    # Verdict.

    def fault(self, name: str) -> int:
        return self.ledger.fault(name)

    async def settle(self, timeout: float, quiet: float = 1.0) -> None:
        """Wait for the load to be submitted, every task to end, then `quiet` seconds without news."""
        for load in self.loads:
            await load.wait_submitted(timeout)
        await eventually(self.ledger.settled, timeout, interval=0.05, what=self._missing_text)
        await eventually(lambda: now_ms() - self.ledger.last_activity_ms > quiet * 1000, timeout=quiet * 3 + 10)

    def _missing_text(self) -> str:
        missing = self.ledger.missing()
        return f"{len(missing)} tasks without a result, e.g. {missing[:5]}"

    def summarize(self, **extra: Any) -> Summary:
        fenced: dict[str, int] = {}
        if self.workers:
            fenced["worker_stale"] = sum(w.stats.stale for w in self.workers)
            fenced["worker_dup_dropped"] = sum(w.stats.duplicates for w in self.workers)
        if self.dispatchers:
            fenced["dispatcher_stale"] = sum(d.stats.stale_reports for d in self.dispatchers)
        client_results: dict[str, Any] = {}
        for client in self.clients:
            client_results.update(client.results)
        self.summary = Summary.of(
            self.name,
            self.size.name,
            self.ledger,
            duration_s=time.monotonic() - self.started_at,
            client_results=client_results if self.clients else None,
            client_duplicates=sum(c.duplicates for c in self.clients) if self.clients else None,
            fenced=fenced,
            extra=extra,
        )
        if self.registry is not None:
            self.registry.append(self.summary)
        print("\n" + self.summary.line())
        return self.summary


def instrumented_worker(
    addresses: str | Sequence[str],
    worker_id: str,
    slots: int,
    ledger: Ledger,
    settings: WorkerSettings,
    actions: Sequence[str] = (),
) -> Worker:
    """A worker with the demo actions (only `actions` if given), recording when each attempt starts running."""
    worker = Worker(addresses, slots=slots, worker_id=worker_id, settings=settings)
    if actions:
        for name in actions:

            async def echo_as(ctx: TaskContext) -> bytes:
                ledger.on_start(ctx.task_id, ctx.attempt, ctx.worker_id)
                return ctx.payload

            worker.register(name, echo_as)
        return worker

    @worker.action("echo")
    async def echo(ctx: TaskContext) -> bytes:
        ledger.on_start(ctx.task_id, ctx.attempt, ctx.worker_id)
        return ctx.payload

    @worker.action("sleep")
    async def sleep(ctx: TaskContext) -> bytes:
        ledger.on_start(ctx.task_id, ctx.attempt, ctx.worker_id)
        await asyncio.sleep(float(ctx.json()["seconds"]))
        return ctx.payload

    @worker.action("fail")
    async def fail(ctx: TaskContext) -> bytes:
        ledger.on_start(ctx.task_id, ctx.attempt, ctx.worker_id)
        raise RuntimeError("failed on purpose")

    @worker.action("fail_permanently")
    async def fail_permanently(ctx: TaskContext) -> bytes:
        ledger.on_start(ctx.task_id, ctx.attempt, ctx.worker_id)
        raise PermanentError("failed for good")

    return worker


async def wait_serving(port: int, proc: Proc | None = None, timeout: float = 20) -> None:
    """Until the gRPC health service on `port` says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.process.returncode is not None:
                raise AssertionError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if loop.time() > deadline:
                raise AssertionError(f"nothing serving on port {port} within {timeout}s")
            await asyncio.sleep(0.1)


async def health_status(port: int) -> str:
    """SERVING, NOT_SERVING, or the error code when nothing answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def known_bug(violated: bool, what: str) -> None:
    """An invariant this suite found broken and that is reported, not fixed here: xfail naming it.

    Call after every hard assertion; the figures are in the table either way, and once the bug
    is fixed the test passes again (remove the call then).
    """
    import pytest

    if violated:
        pytest.xfail(f"KNOWN BUG (see RELIABILITY.md): {what}")


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(coro, 30)


async def two_dispatchers(sc: Scenario, **env: str) -> tuple[Proc, list[str], list[int], Any, list[Any]]:
    """Two subprocess dispatchers, a scheduler, and six workers that know both (half list each first).

    Returns the first dispatcher's process (the one the scenario acts on), both ids and ports, the
    scheduler and the workers, once the scheduler sees every worker.
    """
    ports = [free_port(), free_port()]
    ids = [f"da-{sc.prefix[-8:]}", f"db-{sc.prefix[-8:]}"]
    first = await sc.spawn_dispatcher(ids[0], ports[0], **env)
    await sc.spawn_dispatcher(ids[1], ports[1], **env)
    scheduler = await sc.start_scheduler()
    a, b = (f"127.0.0.1:{p}" for p in ports)
    workers = [await sc.start_worker([a, b] if i % 2 == 0 else [b, a], f"w{i}", slots=10) for i in range(6)]
    await eventually(lambda: sum(w.ready for w in scheduler.pool) >= 6, 15, what="scheduler sees every worker")
    return first, ids, ports, scheduler, workers
