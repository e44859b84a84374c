"""Celery and Dramatiq beside Sluicegate: the same no-op task on the same broker, a worker each, cleaned up after.

A rival is one of `RIVALS`: a framework, its worker's pool and concurrency. The producer side
(`connect`) is blocking, as both frameworks' client APIs are: the benchmark calls it from a thread,
an open-loop producer process (bench.producer) from its own. Every name a rival declares starts with
the run's queue name and is deleted by `delete_queues`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiormq

from bench import celery_app, dramatiq_app
from bench.procs import Child, CpuMeter, Processes, python_module
from sluicegate import amqp


@dataclass(frozen=True, slots=True)
class Rival:
    name: str  # celery-threads, celery-prefork, dramatiq
    framework: str  # the module: celery or dramatiq
    pool: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.framework} {self.pool}"


RIVALS = {
    "celery-threads": Rival("celery-threads", "celery", "threads x20", 20),
    "celery-prefork": Rival("celery-prefork", "celery", "prefork x2", 2),
    "dramatiq": Rival("dramatiq", "dramatiq", "2 processes x 10 threads", 10),
}


def available(rival: Rival) -> bool:
    return importlib.util.find_spec(rival.framework) is not None


def worker_argv(rival: Rival, queue: str) -> list[str]:
    if rival.framework == "dramatiq":
        threads = ["--processes", "2", "--threads", str(rival.concurrency), "--queues", queue]
        return python_module("dramatiq", "bench.dramatiq_app:setup", *threads)
    pool = rival.name.removeprefix("celery-")
    return python_module(
        "celery",
        "-A",
        "bench.celery_app",
        "worker",
        "--pool",
        pool,
        "-c",
        str(rival.concurrency),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "WARNING",
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
    )


class Producer(Protocol):
    """The producer side of one rival: send one task at a time, then collect when each started."""

    def send(self, task_id: str, sent: float) -> None: ...

    def collect(self, timeout: float) -> dict[str, tuple[float, float]]:
        """(send time, handler start) of every task sent, by id; missing ones are left out."""
        ...

    def close(self) -> None: ...


@dataclass
class CeleryProducer:
    """`apply_async` per task, rpc:// results (to this producer only)."""

    url: str
    queue: str
    payload_bytes: int
    app: Any = None
    handles: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.app = celery_app.make_app(self.url, self.queue)
        self.task = self.app.tasks[celery_app.TASK_NAME]

    def send(self, task_id: str, sent: float) -> None:
        payload = celery_app.make_payload(sent, self.payload_bytes)
        self.handles[task_id] = self.task.apply_async(args=[payload], task_id=task_id)

    def collect(self, timeout: float) -> dict[str, tuple[float, float]]:
        result_set = importlib.import_module("celery.result").ResultSet(list(self.handles.values()))
        ids = list(self.handles)
        self.handles.clear()
        try:
            values = result_set.get(timeout=timeout)
        except Exception:  # a timeout: the run reports what it got, nothing here
            return {}
        return {task_id: (float(v[0]), float(v[1])) for task_id, v in zip(ids, values, strict=True)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.app.close()


@dataclass
class DramatiqProducer:
    """`actor.send` per task; each task answers on this producer's own reply queue."""

    url: str
    queue: str
    payload_bytes: int
    reply_to: str
    sent: int = 0

    def __post_init__(self) -> None:
        self.broker, self.actor = dramatiq_app.make_broker(self.url, self.queue)
        self.broker.channel.queue_declare(self.reply_to, durable=False)
        self.payload = "x" * self.payload_bytes

    def send(self, task_id: str, sent: float) -> None:
        self.actor.send(task_id, sent, self.reply_to, self.payload)
        self.sent += 1

    def collect(self, timeout: float) -> dict[str, tuple[float, float]]:
        found: dict[str, tuple[float, float]] = {}
        deadline = time.monotonic() + timeout
        channel = self.broker.channel
        # A consumer, not a get per message: the answers stream in as they come.
        for method, _, body in channel.consume(self.reply_to, auto_ack=True, inactivity_timeout=0.5):
            if method is not None:
                task_id, sent, started = dramatiq_app.reply(body)
                found[task_id] = (sent, started)
            if len(found) >= self.sent or time.monotonic() > deadline:
                break
        channel.cancel()
        self.sent = 0
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.broker.close()


def connect(rival: Rival, url: str, queue: str, payload_bytes: int, name: str) -> Producer:
    """The producer side of `rival` on the run's `queue`; `name` tells this producer's reply queue apart."""
    if rival.framework == "dramatiq":
        return DramatiqProducer(url, queue, payload_bytes, reply_to=f"{queue}.reply-{name}")
    return CeleryProducer(url, queue, payload_bytes)


def push(
    rival: Rival, url: str, queue: str, payload_bytes: int, name: str, count: int, timeout: float
) -> tuple[int, float]:
    """Closed loop from a producer of its own: send `count` tasks, then wait for every one.

    Returns (done, seconds). Blocking, and in one thread from connecting to closing: neither
    framework's client may be shared between threads.
    """
    producer = connect(rival, url, queue, payload_bytes, name)
    try:
        started = time.time()
        for i in range(count):
            producer.send(f"{name}-{i}", time.time())
        done = producer.collect(timeout)
        return len(done), time.time() - started
    finally:
        producer.close()


@dataclass(slots=True)
class RivalWorker:
    """A rival's worker process, started and ready (a warm-up went through it)."""

    rival: Rival
    child: Child
    queue: str

    async def stop(self) -> None:
        # Every task is settled by now: a cold shutdown (SIGQUIT for Celery) loses nothing.
        sig = signal.SIGQUIT if self.rival.framework == "celery" else signal.SIGTERM
        await self.child.stop(grace=10.0, sig=sig)


async def start_worker(
    procs: Processes, rival: Rival, url: str, queue: str, payload_bytes: int, warmup: int
) -> RivalWorker:
    """Start the worker; the warm-up doubles as the readiness check (its results come once it consumes)."""
    env = {celery_app.QUEUE_ENV: queue, "RABBITMQ_URL": url}
    child = procs.start(rival.name, worker_argv(rival, queue), env=env)
    worker = RivalWorker(rival, child, queue)
    done, _ = await asyncio.to_thread(push, rival, url, queue, payload_bytes, "warm", max(1, warmup), 120.0)
    if done < max(1, warmup):
        await worker.stop()
        raise RuntimeError(f"{rival.name}: {done} of {warmup} warm-up tasks within 120 s\n{child.log_tail()}")
    return worker


async def closed_loop(
    worker: RivalWorker, url: str, tasks: int, payload_bytes: int, timeout: float, meter: CpuMeter
) -> dict[str, Any]:
    """`tasks` sent as fast as one producer (in this process) can, then every result: tasks/s, CPU per task."""
    meter.start()
    done, elapsed = await asyncio.to_thread(push, worker.rival, url, worker.queue, payload_bytes, "tp", tasks, timeout)
    cpu = meter.stop()
    return {
        "rival": worker.rival.name,
        "label": worker.rival.label,
        "tasks": tasks,
        "received": done,
        "elapsed_s": elapsed,
        "tasks_per_s": done / elapsed if elapsed > 0 else 0.0,
        "cpu_us_per_task": {k: v / max(1, done) * 1e6 for k, v in cpu.items()},
    }


def queue_names(rival: Rival, queue: str, replies: list[str]) -> list[str]:
    """Every queue a rival's run may have declared."""
    if rival.framework == "dramatiq":
        return [queue, f"{queue}.DQ", f"{queue}.XQ", *(f"{queue}.reply-{r}" for r in replies)]
    return [queue]


async def delete_queues(url: str, queues: list[str], exchanges: list[str]) -> None:
    """Delete the named queues and exchanges, each if it exists (Celery's rpc:// reply queues auto-delete)."""
    with contextlib.suppress(Exception):
        connection = await amqp.connect(url, deadline=5)
        async with connection:
            channel = await connection.channel()
            for name, delete in [*((q, "queue") for q in queues), *((e, "exchange") for e in exchanges)]:
                try:
                    if delete == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except aiormq.exceptions.AMQPError:
                    channel = await connection.channel()  # a failed delete closes the channel
