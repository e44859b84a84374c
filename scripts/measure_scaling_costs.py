"""Measure the costs scripts/scaling_model.py needs beyond the benchmark's per-task CPU figures.

    .venv/bin/python scripts/measure_scaling_costs.py snapshots   # worker-state costs, no broker needed
    .venv/bin/python scripts/measure_scaling_costs.py broker      # one private node vs a private 3-node cluster

`snapshots` times what a worker-state snapshot costs per worker in it: the dispatcher building and
serialising a DispatcherState, the scheduler decoding it and applying it to its WorkerPool.
`broker` publishes (with confirms) and consumes (with acks) the same messages through one quorum
queue on a private node and then on a private three-node cluster (never the shared broker), and
divides the broker processes' CPU time by the messages. Both print the lines to copy into
scripts/scaling_costs.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def snapshots(workers: int = 1000, rounds: int = 30) -> None:
    from sluicegate.v1 import messages_pb2
    from sluicegate_scheduler.assignment import WorkerPool, WorkerReport

    def build() -> bytes:
        state = messages_pb2.DispatcherState(dispatcher_id="d1", seq=1, at_ms=1)
        for i in range(workers):
            state.workers.append(
                messages_pb2.WorkerState(
                    worker_id=f"worker-{i}", session_id=f"session-{i}", tenant="default",
                    actions=["echo", "sleep"], labels={"zone": "a"}, slots=10, free_slots=i % 10,
                    ready=True, received=i,
                )
            )  # fmt: skip
        return state.SerializeToString()

    body = build()
    started = time.process_time()
    for _ in range(rounds):
        build()
    build_us = (time.process_time() - started) / rounds / workers * 1e6

    pool = WorkerPool()
    started = time.process_time()
    for seq in range(rounds):
        state = messages_pb2.DispatcherState.FromString(body)
        reports = [
            WorkerReport(
                worker_id=w.worker_id, session_id=w.session_id, tenant=w.tenant, actions=w.actions,
                labels=dict(w.labels), slots=w.slots, free_slots=w.free_slots, ready=w.ready, received=w.received,
            )
            for w in state.workers
        ]  # fmt: skip
        pool.update(state.dispatcher_id, seq + 1, False, reports, float(seq))
    apply_us = (time.process_time() - started) / rounds / workers * 1e6
    print(f"# {workers} workers per snapshot, {rounds} rounds, CPU time of this process")
    print(f"dispatcher_snapshot_us_per_worker = {build_us:.2f}")
    print(f"scheduler_view_us_per_worker = {apply_us:.2f}")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children is not enough: sum the whole process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pid:  # process group id (field 5 of stat)
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def _run_load(urls: list[str], groups: list[int], messages: int, size: int) -> tuple[float, list[float]]:
    import aio_pika

    from sluicegate import amqp

    publisher = await aio_pika.connect(urls[0])
    consumer = await aio_pika.connect(urls[-1])
    name = f"sg-measure-{os.getpid()}"
    try:
        pch = await publisher.channel(publisher_confirms=True)
        cch = await consumer.channel()
        await cch.set_qos(prefetch_count=200)
        queue = await cch.declare_queue(name, durable=True, arguments=amqp.quorum())
        got = asyncio.Event()
        count = 0

        async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count >= messages:
                got.set()

        await queue.consume(on)
        body = b"x" * size
        before = [_cpu_seconds(g) for g in groups]
        started = time.monotonic()
        in_flight: set[asyncio.Task[None]] = set()
        for _ in range(messages):
            task = asyncio.create_task(amqp.publish(pch.default_exchange, name, body, timeout=30))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if len(in_flight) >= 50:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait_for(got.wait(), 120)
        elapsed = time.monotonic() - started
        after = [_cpu_seconds(g) for g in groups]
        await cch.queue_delete(name)
        return elapsed, [a - b for a, b in zip(after, before, strict=True)]
    finally:
        await publisher.close()
        await consumer.close()


async def broker(messages: int = 20000, size: int = 4096) -> None:
    from tests.chaos.broker import PrivateBroker, PrivateCluster

    single = PrivateBroker()
    await single.start()
    try:
        assert single.process is not None
        elapsed, cpu = await _run_load([single.url], [single.process.pid], messages, size)
    finally:
        await single.close()
    one = cpu[0] / messages * 1e6
    print(f"# {messages} messages of {size} B, published with confirms and consumed with acks")
    print(f"# one node: {messages / elapsed:.0f} msg/s, broker CPU {one:.0f} us per message")

    cluster = PrivateCluster(3)
    await cluster.start()
    try:
        groups = [n.process.pid for n in cluster.nodes if n.process is not None]
        elapsed, cpu = await _run_load(cluster.urls, groups, messages, size)
    finally:
        await cluster.close()
    per_node = [c / messages * 1e6 for c in cpu]
    total = sum(per_node)
    print(f"# three nodes: {messages / elapsed:.0f} msg/s, broker CPU per message by node (us): "
          + ", ".join(f"{x:.0f}" for x in per_node))  # fmt: skip
    print(f"broker_us_per_message = {one:.0f}")
    print(f"cluster_cpu_factor = {total / one:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["snapshots", "broker"])
    args = parser.parse_args()
    if args.what == "snapshots":
        snapshots()
    else:
        asyncio.run(broker())
    return 0


if __name__ == "__main__":
    sys.exit(main())
