"""What the integration tests of waiting tasks measure with: handlers that record starts, steady and
flooding producers, a scheduler in a process of its own, and percentiles."""

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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sluicegate.client import Client, TaskResult, TaskSpec
from sluicegate.settings import BrokerSettings
from sluicegate.wire import now_ms
from sluicegate.worker import TaskContext, Worker


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
            "SLUICEGATE_PARTITIONS": str(broker.partitions),
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await asyncio.to_thread(scrape, self.port, "/readyz"))[0] != 200:
            assert self.process.returncode is None, "the scheduler process ended"
            assert loop.time() < deadline, "the scheduler process never became ready"
            await asyncio.sleep(0.1)
        return self

    async def metrics(self) -> Samples:
        status, text = await asyncio.to_thread(scrape, self.port)
        assert status == 200, text
        return samples(text)

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
