"""The Celery half of the side-by-side: start a worker, push the same no-op tasks, stop it, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiormq

from bench.celery_app import QUEUE_ENV, TASK_NAME, make_app, make_payload
from bench.procs import Child, CpuMeter, Processes, python_module
from sluicegate import amqp

log = logging.getLogger(__name__)


def celery_available() -> bool:
    return importlib.util.find_spec("celery") is not None


def celery_version() -> str:
    if not celery_available():
        return "-"
    import importlib.metadata

    return importlib.metadata.version("celery")


@dataclass(slots=True)
class CeleryFigures:
    pool: str
    concurrency: int
    tasks: int
    received: int
    elapsed_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.received / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _push(app: Any, count: int, payload_bytes: int, timeout: float) -> tuple[int, float]:
    """Send `count` tasks, then wait for every result; returns (results, seconds). Blocking."""
    task = app.tasks[TASK_NAME]
    result_set_type = importlib.import_module("celery.result").ResultSet
    started = time.time()
    handles = [task.apply_async(args=[make_payload(time.time(), payload_bytes)]) for _ in range(count)]
    values = result_set_type(handles).get(timeout=timeout)
    return len(values), time.time() - started


def _close(app: Any) -> None:
    with contextlib.suppress(Exception):
        app.close()


async def run_celery(
    procs: Processes,
    *,
    url: str,
    queue: str,
    pool: str,
    concurrency: int,
    tasks: int,
    warmup: int,
    payload_bytes: int,
    timeout: float,
) -> CeleryFigures:
    """One Celery measurement with a worker process of `pool` x `concurrency`; always stops it."""
    argv = python_module(
        "celery",
        "-A",
        "bench.celery_app",
        "worker",
        "--pool",
        pool,
        "-c",
        str(concurrency),
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
    worker: Child = procs.start(f"celery-{pool}", argv, env={QUEUE_ENV: queue, "RABBITMQ_URL": url})
    app = await asyncio.to_thread(make_app, url, queue)
    try:
        # The warm-up doubles as the readiness check: its results come back once the worker consumes.
        await asyncio.to_thread(_push, app, warmup, payload_bytes, 120.0)
        meter = CpuMeter({"celery worker": worker.pid, "client": os.getpid()}, trees=frozenset({"celery worker"}))
        meter.start()
        received, elapsed = await asyncio.to_thread(_push, app, tasks, payload_bytes, timeout)
        cpu = meter.stop()
        return CeleryFigures(pool, concurrency, tasks, received, elapsed, cpu)
    finally:
        await asyncio.to_thread(_close, app)
        # Every task is settled by now: a cold shutdown (SIGQUIT) loses nothing and skips the slow warm one.
        await worker.stop(grace=10.0, sig=signal.SIGQUIT)


async def delete_celery_names(url: str, queue: str) -> None:
    """Delete the queue and exchange a Celery run declared (the rpc:// reply queue auto-deletes)."""
    with contextlib.suppress(Exception):
        connection = await amqp.connect(url, deadline=5)
        async with connection:
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
            except aiormq.exceptions.AMQPError:
                channel = await connection.channel()  # a failed delete closes the channel
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.exchange_delete(queue)
