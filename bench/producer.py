"""One open-loop producer process: one task per submit, on a timetable, as a user's code submits them.

    python -m bench.producer --system sluicegate --index 0 --producers 4 --payload-bytes 512

The benchmark starts several of these (bench.openloop). Each connects, prints `ready`, then runs
one timetable per line it reads on stdin, `go NAME ORIGIN RATE COUNT OUT`: task k of the run
(0 <= k < COUNT) is due at ORIGIN + k / RATE (unix seconds), and this producer sends the tasks
with k % PRODUCERS == INDEX, each on its own as soon as it is due (a Sluicegate `Client.submit`,
a Celery `apply_async`, a Dramatiq `send`), whatever came back so far. It then waits for their
results, writes the samples as JSON to OUT and prints `done`. An empty line or EOF ends it.

Latency is taken from the due time, so a producer that falls behind its timetable counts as late.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import astuple
from pathlib import Path

import uvloop

from bench import rivals
from bench.fleet import NOOP_ACTION, make_payload, read_output
from bench.runs import Sample
from sluicegate.client import Client
from sluicegate.settings import BrokerSettings, load
from sluicegate.v1 import messages_pb2

RESULT_TIMEOUT = 60.0


class Timetable:
    """The due times of one producer's share of a run."""

    def __init__(self, name: str, origin: float, rate: float, count: int, index: int, producers: int) -> None:
        self.slots = [(f"{name}-{k}", origin + k / rate) for k in range(index, count, producers)]
        self.worst_lag = 0.0

    def note_lag(self, due: float) -> None:
        """Keep the worst lateness of a send behind its due time."""
        self.worst_lag = max(self.worst_lag, time.time() - due)


def _sluicegate_sample(task_id: str, due: float, result: messages_pb2.TaskResult | None, arrived: float) -> Sample:
    stamps = read_output(result.output) if result is not None else None
    history = list(result.history) if result is not None else []
    return Sample(
        task_id=task_id,
        scheduled=due,
        started=stamps[1] if stamps else None,
        arrived=arrived if result is not None else None,
        worker_id=result.worker_id if result is not None else "",
        attempt=result.attempt if result is not None else 0,
        requeued_at=history[-1].at_ms / 1000 if history else None,
        reasons=tuple(r.reason for r in history),
        ok=result is not None and result.status == messages_pb2.TASK_STATUS_COMPLETED,
    )


async def run_sluicegate(client: Client, table: Timetable, payload_bytes: int) -> list[Sample]:
    async def one(task_id: str, due: float) -> Sample:
        await client.submit(NOOP_ACTION, make_payload(due, payload_bytes), task_id=task_id)
        try:
            result = await client.result(task_id, RESULT_TIMEOUT)
        except TimeoutError:
            return _sluicegate_sample(task_id, due, None, 0.0)
        return _sluicegate_sample(task_id, due, result, time.time())

    pending = []
    for task_id, due in table.slots:
        if (wait := due - time.time()) > 0:
            await asyncio.sleep(wait)
        table.note_lag(due)
        pending.append(asyncio.create_task(one(task_id, due)))
    return list(await asyncio.gather(*pending))


def run_rival(producer: rivals.Producer, table: Timetable) -> list[Sample]:
    for task_id, due in table.slots:
        if (wait := due - time.time()) > 0:
            time.sleep(wait)
        table.note_lag(due)
        producer.send(task_id, due)
    started = producer.collect(RESULT_TIMEOUT)
    samples = []
    for task_id, due in table.slots:
        stamps = started.get(task_id)
        samples.append(Sample(task_id, due, stamps[1] if stamps else None, None, "", 1, None, (), stamps is not None))
    return samples


def _commands() -> list[str] | None:
    line = sys.stdin.readline().strip()
    return line.split() if line.startswith("go ") else None


def _write(out: str, samples: list[Sample], table: Timetable) -> None:
    body = {"samples": [astuple(s) for s in samples], "max_lag_ms": table.worst_lag * 1000}
    Path(out).write_text(json.dumps(body))
    print("done", flush=True)


def _timetable(command: list[str], args: argparse.Namespace) -> tuple[Timetable, str]:
    _, name, origin, rate, count, out = command
    return Timetable(name, float(origin), float(rate), int(count), args.index, args.producers), out


async def serve_sluicegate(args: argparse.Namespace) -> int:
    async with Client(load(BrokerSettings)) as client:
        print("ready", flush=True)
        while (command := await asyncio.to_thread(_commands)) is not None:
            table, out = _timetable(command, args)
            _write(out, await run_sluicegate(client, table, args.payload_bytes), table)
    return 0


def serve_rival(args: argparse.Namespace) -> int:
    rival = rivals.RIVALS[args.system]
    url = load(BrokerSettings).urls[0]
    producer = rivals.connect(rival, url, args.queue, args.payload_bytes, f"p{args.index}")
    try:
        print("ready", flush=True)
        while (command := _commands()) is not None:
            table, out = _timetable(command, args)
            _write(out, run_rival(producer, table), table)
    finally:
        producer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.producer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", required=True, choices=["sluicegate", *rivals.RIVALS])
    parser.add_argument("--queue", default="", help="the rival's queue (Celery, Dramatiq)")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--producers", type=int, required=True)
    parser.add_argument("--payload-bytes", type=int, default=512)
    args = parser.parse_args(argv)
    if args.system == "sluicegate":
        return uvloop.run(serve_sluicegate(args))
    return serve_rival(args)


if __name__ == "__main__":
    sys.exit(main())
