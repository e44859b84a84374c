"""The Celery side of the benchmark: the same no-op task, on the same broker.

Celery is a benchmark extra (`pip install -e '.[bench]'`), never a runtime dependency: only
the benchmark imports this module, and only when Celery is installed. The worker is started as

    celery -A bench.celery_app worker --pool threads -c 20

with SLUICEGATE_BENCH_QUEUE naming the queue (and exchange) the run uses and RABBITMQ_URL
the broker. Settings: RabbitMQ broker, `rpc://` result backend, late acks, everything else Celery's
defaults (prefetch multiplier 4, JSON serializer, no publisher confirms). Remote control, events,
gossip, mingle and heartbeats are off so that the run declares nothing outside its own names.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

QUEUE_ENV = "SLUICEGATE_BENCH_QUEUE"
TASK_NAME = "bench.noop"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


def noop(payload: str) -> list[float]:
    """The benchmark's task: the send time the payload starts with, and when the task started."""
    started = time.time()
    try:
        sent = float(payload[:20])
    except ValueError:
        sent = 0.0
    return [sent, started]


def make_payload(send_time: float, size: int = 512) -> str:
    """A `size`-character JSON-safe payload that starts with the send time."""
    return f"{send_time:<20.6f}".ljust(size, "x")[: max(size, 20)]


def make_app(url: str, queue: str) -> Any:
    """A Celery app for one benchmark run, with the no-op task registered as `bench.noop`."""
    celery = importlib.import_module("celery")
    app = celery.Celery("sluicegate_bench", broker=url, backend="rpc://")
    app.conf.update(
        task_acks_late=True,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME)(noop)
    return app


def _app_from_env() -> Any:
    url = os.environ.get("RABBITMQ_URL") or os.environ.get("SLUICEGATE_RABBITMQ_URL") or DEFAULT_URL
    return make_app(url, os.environ.get(QUEUE_ENV, "sluicegate-bench-celery"))


def __getattr__(name: str) -> Any:
    # `celery -A bench.celery_app` looks up `app`; built on first use so that importing
    # this module for its helpers never needs Celery.
    if name == "app":
        app = _app_from_env()
        globals()["app"] = app
        return app
    raise AttributeError(name)
