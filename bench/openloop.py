"""Open loop from several producer processes (bench.producer): the rate → submit→start curve of one system."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.procs import Child, CpuMeter, Processes, merged, python_module
from bench.runs import RunResult, Sample

START_DELAY = 0.3  # seconds from sending the timetable to its first due time
RESULT_WAIT = 60.0  # a producer's wait for its last results (bench.producer.RESULT_TIMEOUT)


class Producers:
    """`count` producer processes of one system, started once for a whole curve."""

    def __init__(
        self,
        procs: Processes,
        system: str,
        count: int,
        *,
        env: dict[str, str],
        payload_bytes: int,
        tag: str,
        queue: str = "",
    ) -> None:
        self.procs = procs
        self.system = system
        self.count = count
        self.env = env
        self.payload_bytes = payload_bytes
        self.tag = tag
        self.queue = queue
        self.children: list[Child] = []

    async def start(self, timeout: float = 60.0) -> None:
        for i in range(self.count):
            argv = python_module(
                "bench.producer",
                "--system",
                self.system,
                "--queue",
                self.queue,
                "--index",
                str(i),
                "--producers",
                str(self.count),
                "--payload-bytes",
                str(self.payload_bytes),
            )
            self.children.append(
                self.procs.start(f"{self.tag}-producer{i}", argv, env=self.env, stdout=True, stdin=True)
            )
        for child in self.children:
            line = await child.read_line(timeout)
            if line != "ready":
                raise RuntimeError(f"{child.name}: {line}\n{child.log_tail()}")

    def pids(self) -> dict[str, int]:
        return {f"client{i}": child.pid for i, child in enumerate(self.children)}

    async def run(
        self, name: str, rate: float, duration: float, out_dir: Path, meter: CpuMeter
    ) -> tuple[RunResult, dict[str, float]]:
        """One timetable of `rate` tasks/s for `duration` s over every producer; CPU seconds per process."""
        count = max(1, round(rate * duration))
        origin = time.time() + START_DELAY
        outs = [out_dir / f"{name}-{i}.json" for i in range(self.count)]
        meter.pids.update(self.pids())
        meter.start()
        for child, out in zip(self.children, outs, strict=True):
            child.write_line(f"go {name} {origin!r} {rate!r} {count} {out}")
        for child in self.children:
            line = await child.read_line(START_DELAY + duration + RESULT_WAIT + 30)
            if line != "done":
                raise RuntimeError(f"{child.name}: {line}\n{child.log_tail()}")
        used = merged(meter.stop())
        samples: list[Sample] = []
        lag = 0.0
        for out in outs:
            body: dict[str, Any] = json.loads(out.read_text())
            samples += [Sample.from_row(row) for row in body["samples"]]
            lag = max(lag, body["max_lag_ms"])
        run = RunResult(name, count, origin, sorted(samples, key=lambda s: s.scheduled))
        run.offered_rate = rate
        run.send_lag_ms = lag
        return run, used

    async def stop(self) -> None:
        """An empty line ends each producer, which closes its client (deleting its result queue) first."""
        for child in self.children:
            if child.alive():
                with contextlib.suppress(OSError):
                    child.write_line("")
        await asyncio.gather(*(child.stop(grace=10.0, sig=None) for child in self.children))
        self.children = []


def started_rate(run: RunResult) -> float:
    """Tasks started per second from the first due time to the last start: the rate the system kept up."""
    starts = [s.started for s in run.samples if s.started is not None]
    if len(starts) < 2:
        return 0.0
    span = max(starts) - run.started_at
    return len(starts) / span if span > 0 else 0.0
