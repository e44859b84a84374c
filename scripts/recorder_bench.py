"""How fast the recorder writes lifecycle events into PostgreSQL: the catch-up rate on a backlog.

Publishes EVENTS lifecycle events (stories of four events per task, as the emitter batches them)
into a fresh `<prefix>.lifecycle` queue while no recorder runs, then starts one recorder and times
how long it takes until every event is in a fresh database. Both are deleted afterwards.

    .venv/bin/python scripts/recorder_bench.py --events 200000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

from sluicegate import amqp
from sluicegate.lifecycle import K, LifecycleEmitter, LifecycleSettings, assignment_event, task_event
from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, schema
from sluicegate.v1 import messages_pb2
from sluicegate_recorder.app import Recorder
from sluicegate_recorder.settings import RecorderSettings


def _story(n: int, output: bytes) -> list[messages_pb2.LifecycleEvent]:
    task = messages_pb2.Task(task_id=f"{n:012d}", tenant="bench", action="echo", payload=b"x" * 64)
    attempt = messages_pb2.Assignment(task=task, attempt=1, worker_id=f"w{n % 50}", dispatcher_id="d1")
    now = int(time.time() * 1000)
    return [
        task_event(K.KIND_SUBMITTED, task, include_task=True, at_ms=now),
        assignment_event(K.KIND_ASSIGNED, attempt, at_ms=now + 1),
        assignment_event(K.KIND_STARTED, attempt, at_ms=now + 2),
        assignment_event(K.KIND_COMPLETED, attempt, output=output, at_ms=now + 3),
    ]


async def _publish(broker: BrokerSettings, tasks: int, output: bytes, batch: int) -> None:
    topology = amqp.Topology(broker.prefix)
    connection = await aio_pika.connect_robust(broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await amqp.declare_lifecycle_queue(channel, topology)
        exchange = await amqp.declare_exchange(channel, topology.events, aio_pika.ExchangeType.TOPIC)
        emitter = LifecycleEmitter(topology, "bench", LifecycleSettings(max_batch=batch, buffer=10_000_000))
        loop = asyncio.create_task(emitter.run(exchange))
        for n in range(tasks):
            for event in _story(n, output):
                emitter.emit(event)
            if n % 1000 == 999:
                await asyncio.sleep(0)
        await emitter.drain(600)
        loop.cancel()
        print(f"published {emitter.published} events in {emitter.batches} messages")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to record (a multiple of 4)")
    parser.add_argument("--output-bytes", type=int, default=32, help="output size of each completed task")
    parser.add_argument("--message-events", type=int, default=1000, help="events per AMQP message")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--max-batch-events", type=int, default=5000)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SLUICEGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a throw-away database may be created",
    )
    args = parser.parse_args()
    tasks = args.events // 4
    broker = BrokerSettings(prefix=f"bench-{uuid.uuid4().hex[:8]}")
    name = f"sluicegate_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(args.postgres_url)._replace(path=f"/{name}"))
    try:
        connection = await asyncpg.connect(url)
        await schema.migrate(connection)
        await connection.close()
        await _publish(broker, tasks, b"o" * args.output_bytes, args.message_events)
        settings = RecorderSettings(prefetch=args.prefetch, max_batch_events=args.max_batch_events)
        started = time.perf_counter()  # from the connect on: the recorder consumes as soon as it started
        async with Recorder(settings, StoreSettings(url=url), broker) as recorder:
            while recorder.stats.recorded < tasks * 4:  # noqa: ASYNC110 - polling a counter, 10 ms is precise enough
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
        transactions = recorder.stats.transactions
        print(
            f"recorded {recorder.stats.recorded} events of {tasks} tasks in {elapsed:.2f} s:"
            f" {recorder.stats.recorded / elapsed:,.0f} events/s, {transactions} transactions"
            f" ({recorder.stats.recorded / max(transactions, 1):.0f} events each)"
        )
    finally:
        connection = await aio_pika.connect_robust(broker.url)
        async with connection:
            await amqp.delete_topology(connection, amqp.Topology(broker.prefix), [])
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
