"""The Dramatiq side of the benchmark: the same no-op task, on the same broker.

Dramatiq is a benchmark extra (`pip install -e '.[bench]'`), never a runtime dependency. The worker
is started as

    dramatiq bench.dramatiq_app:setup --processes 2 --threads 10 --queues QUEUE

with SLUICEGATE_BENCH_QUEUE naming the queue and RABBITMQ_URL the broker. Settings: Dramatiq's
RabbitMQ broker and default middleware, no publisher confirms (its default), no retries. Dramatiq
has no result backend here: the task answers with one small message to the queue its producer
named (the completion count needs no Redis), on the broker connection of the worker thread.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

QUEUE_ENV = "SLUICEGATE_BENCH_QUEUE"
ACTOR = "noop"


def noop(task_id: str, sent: float, reply_to: str, payload: str) -> None:
    """The benchmark's task: tell the producer which task it was, when it was sent and when it started."""
    started = time.time()
    channel = importlib.import_module("dramatiq").get_broker().channel  # this thread's channel
    channel.basic_publish(exchange="", routing_key=reply_to, body=f"{task_id} {sent!r} {started!r}".encode())


def make_broker(url: str, queue: str) -> tuple[Any, Any]:
    """A RabbitMQ broker for one run, set as Dramatiq's global broker, and the no-op actor on `queue`."""
    dramatiq = importlib.import_module("dramatiq")
    rabbitmq = importlib.import_module("dramatiq.brokers.rabbitmq")
    broker = rabbitmq.RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(noop, actor_name=ACTOR, queue_name=queue, max_retries=0, broker=broker)
    return broker, actor


def setup() -> None:
    """`dramatiq bench.dramatiq_app:setup`: the broker and actor from the environment."""
    url = os.environ.get("RABBITMQ_URL") or os.environ.get("SLUICEGATE_RABBITMQ_URL") or ""
    make_broker(url.split(",")[0], os.environ[QUEUE_ENV])


def reply(body: bytes) -> tuple[str, float, float]:
    """(task id, send time, start time) from a no-op's answer."""
    task_id, sent, started = body.decode().split(" ")
    return task_id, float(sent), float(started)
