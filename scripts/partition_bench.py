"""Scheduling throughput with P = 1, 2, 4 scheduler partitions when the scheduler is the bottleneck.

Each run has its own prefix: one dispatcher and `--workers` demo worker processes (action `echo`,
`--slots` each), P scheduler processes (partitions 0..P-1) each given the same fixed synthetic
cost per placement (SLUICEGATE_SCHEDULER_SYNTHETIC_COST), and a client in this process that
submits `--tasks` tasks of one tenant, spread over the partitions by partition key, and waits for
every result. The workers are shared by every partition, so the run also measures what sharing
costs: the requeues the schedulers counted, per task.

Throughput is tasks finished per second between the 10th and the 90th percentile of completions
(the steady part). `--mode cpu` spends the cost on the CPU (the 2 cores of this machine are shared
by everything); `--mode wait` blocks each scheduler's event loop without using the CPU, a model of
each scheduler on a core of its own. Run: `make bench-partitions` (BENCH_PARTITIONS_ARGS=...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluicegate import amqp
from sluicegate.client import Client, TaskSpec
from sluicegate.settings import BrokerSettings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float:
    """Sum of every sample of a metric (all labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Run:
    partitions: int
    tasks: int
    seconds: float
    rate: float
    requeues: float
    assigned: list[float]


class Processes:
    """Service processes of one run, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[tuple[asyncio.subprocess.Process, str, Any]] = []

    async def start(self, *args: str, **env: str) -> asyncio.subprocess.Process:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluicegate", "--log-level", "WARNING", *args,
            env={**self.env, **env}, stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        self.started.append((process, args[0], log))
        return process

    def check(self) -> None:
        """Stop the run, with the process's last words, if any process has ended."""
        for process, role, log in self.started:
            if process.returncode is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise SystemExit(f"the {role} process exited with {process.returncode}:\n{tail}")

    async def stop(self) -> None:
        for process, _, log in reversed(self.started):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            log.close()


async def until(check: Callable[[], bool], what: str, processes: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        processes.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(0.2)


def keys_for(partitions: int) -> list[str]:
    """One partition key per partition."""
    keys: dict[int, str] = {}
    for i in range(10_000):
        keys.setdefault(amqp.partition_of("bench", partitions, f"k{i}"), f"k{i}")
        if len(keys) == partitions:
            break
    return [keys[p] for p in range(partitions)]


async def run_once(args: argparse.Namespace, partitions: int) -> Run:
    broker = BrokerSettings(prefix=f"pbench-{uuid.uuid4().hex[:8]}", partitions=partitions)
    dispatcher_id = f"pbench-{uuid.uuid4().hex[:6]}"
    grpc_port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_URL": broker.url,
        "SLUICEGATE_PREFIX": broker.prefix,
        "SLUICEGATE_PARTITIONS": str(partitions),
        "SLUICEGATE_METRICS_HOST": "127.0.0.1",
    }
    processes = Processes(env)
    scheduler_ports = [free_port() for _ in range(partitions)]
    try:
        for partition, port in enumerate(scheduler_ports):
            await processes.start(
                "scheduler",
                SLUICEGATE_METRICS_PORT=str(port),
                SLUICEGATE_SCHEDULER_PARTITION=str(partition),
                SLUICEGATE_SCHEDULER_SYNTHETIC_COST=args.cost,
                SLUICEGATE_SCHEDULER_SYNTHETIC_WAIT="true" if args.mode == "wait" else "false",
                SLUICEGATE_SCHEDULER_SLOT_SHARE=args.slot_share,
            )
        dispatcher_metrics = free_port()
        await processes.start(
            "dispatcher", "--id", dispatcher_id, "--listen", f"127.0.0.1:{grpc_port}",
            SLUICEGATE_METRICS_PORT=str(dispatcher_metrics),
        )  # fmt: skip
        for port in [*scheduler_ports, dispatcher_metrics]:
            ready = f"process on metrics port {port} ready"
            await until(lambda port=port: scrape(port, "/readyz")[0] == 200, ready, processes)
        for index in range(args.workers):
            await processes.start(
                "worker", "--dispatchers", f"127.0.0.1:{grpc_port}", "--slots", str(args.slots),
                "--tenant", "bench", "--worker-id", f"bench-{index}",
                SLUICEGATE_METRICS_PORT=str(free_port()),
            )  # fmt: skip
        for port in scheduler_ports:
            await until(
                lambda port=port: metric(scrape(port)[1], "sluicegate_known_workers") >= args.workers,
                "every scheduler knows every worker",
                processes,
            )
        keys = keys_for(partitions)
        async with Client(broker) as client:
            specs = [
                TaskSpec("echo", b"x", tenant="bench", partition_key=keys[i % partitions]) for i in range(args.tasks)
            ]
            done: list[float] = []
            started = time.monotonic()
            ids = await client.submit_many(specs)

            async def finish(task_id: str) -> None:
                await client.result(task_id, timeout=args.timeout)
                done.append(time.monotonic())

            await asyncio.gather(*(finish(task_id) for task_id in ids))
            seconds = time.monotonic() - started
        done.sort()
        low, high = done[len(done) // 10], done[(len(done) * 9) // 10]
        rate = (len(done) * 0.8) / max(high - low, 1e-9)
        texts = [scrape(port)[1] for port in scheduler_ports]
        requeues = sum(metric(text, "sluicegate_requeues_total") for text in texts)
        assigned = [metric(text, "sluicegate_tasks_assigned_total") for text in texts]
        return Run(partitions, args.tasks, seconds, rate, requeues / args.tasks, assigned)
    finally:
        await processes.stop()
        connection = await amqp.connect(broker.urls, deadline=10)
        async with connection:
            await amqp.delete_topology(connection, amqp.Topology(broker.prefix), [dispatcher_id], partitions=partitions)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", default="1,2,4", help="comma-separated counts to run (default 1,2,4)")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per run (default 3000)")
    parser.add_argument("--cost", default="2ms", help="synthetic cost per placement (default 2ms)")
    parser.add_argument("--mode", choices=["cpu", "wait"], default="cpu", help="how the cost is spent (default cpu)")
    parser.add_argument(
        "--slot-share", choices=["exact", "eager"], default="exact", help="how partitions share free slots"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--slots", type=int, default=64, help="slots per worker (default 64)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per count, the median reported (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a run's results")
    args = parser.parse_args(argv)
    try:
        counts = [int(p) for p in args.partitions.split(",")]
    except ValueError:
        print("--partitions takes a comma-separated list of whole numbers", file=sys.stderr)
        return 2
    if not counts or min(counts) < 1 or max(counts) > 64 or args.tasks < 10 or not 1 <= args.repeat <= 20:
        print("--partitions must be between 1 and 64, --tasks at least 10, --repeat 1 to 20", file=sys.stderr)
        return 2
    print(
        f"partition bench: {args.tasks} tasks, cost {args.cost} per placement ({args.mode}), {args.slot_share} shares, "
        f"{args.workers} workers x {args.slots} slots shared by every partition, {os.cpu_count()} cores"
    )
    runs: list[Run] = []
    for count in counts:
        tries = [await run_once(args, count) for _ in range(args.repeat)]
        run = sorted(tries, key=lambda r: r.rate)[len(tries) // 2]  # the median run
        runs.append(run)
        base = runs[0].rate
        print(
            f"P={run.partitions}: {run.rate:7.0f} tasks/s (x{run.rate / base:.2f} of P={runs[0].partitions}), "
            f"all {run.tasks} in {run.seconds:.1f}s, requeues {run.requeues:.2%} per task, "
            f"assigned per partition {[int(a) for a in run.assigned]}; "
            f"rates of the {args.repeat} runs {[round(t.rate) for t in tries]}, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
