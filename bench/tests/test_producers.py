"""Open-loop producer processes end on their own when told to, so that each client deletes its result queue."""

from __future__ import annotations

import uuid
from pathlib import Path

import aio_pika
import pytest

from bench.openloop import Producers
from bench.procs import Processes
from sluicegate import amqp

pytestmark = pytest.mark.timeout(90)


async def test_producers_exit_on_their_own_when_told(rabbitmq_url: str, tmp_path: Path) -> None:
    prefix = f"sluicegate-benchtest-{uuid.uuid4().hex[:8]}"
    procs = Processes(tmp_path, "test")
    env = {"RABBITMQ_URL": rabbitmq_url, "SLUICEGATE_PREFIX": prefix}
    producers = Producers(procs, "sluicegate", 2, env=env, payload_bytes=64, tag="t")
    try:
        await producers.start()
        children = list(producers.children)
        await producers.stop()
        # Exit code 0: each producer left its loop and closed its client; a signal would give a negative one.
        assert [child.popen.returncode for child in children] == [0, 0]
    finally:
        await procs.stop_all()
        async with await aio_pika.connect(rabbitmq_url) as connection:
            await amqp.delete_topology(connection, amqp.Topology(prefix), [])
