"""The benchmark run: every phase in turn, each on its own prefix, every process stopped and every name deleted.

Phases (each can be skipped with --skip):
  throughput  closed loop (`submit_many`, then every result) with CPU per task per process, for
              the main fleet (20 workers) and the many-worker fleet (200)
  latency     open loop from several producer processes, one task per submit: the rate → submit→start
              curve of each fleet
  stall       10 % of the main fleet's workers stop reading: open loop at the lowest rate
  rivals      Celery and Dramatiq (each skipped when not installed): closed loop, then the same curve
  many        the many-worker fleet (its throughput and latency)
  memory      dispatcher RSS before and after the idle streams connect
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from yarl import URL

from bench import meta, record, report, rivals
from bench.openloop import Producers, started_rate
from bench.options import Options, resolve
from bench.procs import CpuMeter, Processes, find_broker_pid, merged, rss_bytes, system_busy_seconds, wait_until_quiet
from bench.profiling import Recorder, py_spy_path
from bench.runs import BenchClient, Distribution, RunResult, Sample, broker_version, closed_loop
from bench.stack import Stack
from sluicegate.settings import BrokerSettings, load

Figures = dict[str, Any]
# The fleets under test connect this many at a time, so that a run starts from a settled fleet; the
# idle streams of the memory figure connect all at once (how long a fleet started together takes).
RAMP = 50
PAUSE = 1.0  # seconds between two points of a curve, so that one's tail does not land in the next


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, options: Options, broker: BrokerSettings, procs: Processes, run_id: str, log_dir: Path) -> None:
        self.o = options
        self.broker = broker
        self.procs = procs
        self.run_id = run_id
        self.log_dir = log_dir
        self.figures: Figures = {"errors": {}, "throughput": {}, "curves": {}}
        self.stacks: list[Stack] = []
        self.rival_queues: list[str] = []
        self.broker_pid = find_broker_pid(URL(broker.urls[0]).port or 5672)

    def prefix(self, tag: str) -> BrokerSettings:
        return self.broker.model_copy(update={"prefix": f"{self.o.prefix}-bench-{self.run_id}-{tag}"})

    def wanted(self, phase: str) -> bool:
        return phase not in self.o.skip

    async def phase(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run one phase; a failure is recorded and the run goes on with the next phase."""
        say(f"== {name}")
        started = time.monotonic()
        try:
            await body()
        except Exception as err:  # a phase that fails must not hide the others' figures
            self.figures["errors"][name] = f"{type(err).__name__}: {err}"
            say(f"   {name} failed: {type(err).__name__}: {err}")
        say(f"   ({time.monotonic() - started:.1f} s)")

    def _timeout(self, tasks: int) -> float:
        return 60.0 + tasks / 50  # generous: a run that needs it is reported as incomplete, not hung

    def _meter(self, pids: dict[str, int], trees: frozenset[str] = frozenset()) -> CpuMeter:
        """CPU of these processes and of the broker (when it runs on this machine)."""
        broker = {"broker": self.broker_pid} if self.broker_pid else {}
        return CpuMeter(pids | broker, trees=trees)

    # Sluicegate.

    async def fleet(self, workers: int, tag: str, *, main: bool) -> None:
        """One Sluicegate deployment with `workers` workers: closed loop, the curve, and (main) the stall."""
        o = self.o
        stack = Stack(self.procs, self.prefix(tag), tag, log_level=o.log_level)
        self.stacks.append(stack)
        producers = Producers(
            self.procs, "sluicegate", o.producers, env=stack.env(), payload_bytes=o.payload_bytes, tag=tag
        )
        try:
            stack.start_scheduler()
            await stack.start_dispatcher(ack_timeout=o.ack_timeout)
            stall_count = max(1, round(workers * o.stall_fraction)) if main else 0
            fleets = 1 if workers <= 50 else 2
            await stack.start_fleets(workers, fleets, o.slots, stall_count=stall_count, ramp=RAMP if fleets > 1 else 0)
            client = BenchClient(stack.broker)
            async with client:
                await self._warm_up(client, stack)
                if self.wanted("throughput"):
                    await self.phase(f"throughput ({workers} workers)", lambda: self.throughput(client, stack))
                if o.profile and main:
                    await self.phase("profile", lambda: self.profile(client, stack))
                if not (self.wanted("latency") or (main and self.wanted("stall"))):
                    return
                await producers.start()
                key = f"sluicegate {workers} workers"
                if self.wanted("latency"):
                    await self.phase(f"latency ({workers} workers)", lambda: self.curve(key, stack.pids(), producers))
                if main and self.wanted("stall"):
                    await self.phase("stall", lambda: self.stall(stack, producers, key))
        finally:
            await producers.stop()
            await stack.stop()

    async def _warm_up(self, client: BenchClient, stack: Stack) -> None:
        if self.o.warmup:
            run = await closed_loop(client, "warm", self.o.warmup, self.o.payload_bytes, 120)
            if run.received < self.o.warmup:
                raise RuntimeError(f"warm-up: {run.received} of {self.o.warmup} results within 120 s")
        stack.check_alive()

    async def throughput(self, client: BenchClient, stack: Stack) -> None:
        o = self.o
        meter = self._meter(stack.pids() | {"client": os.getpid()})
        busy_before = system_busy_seconds()
        meter.start()
        run = await closed_loop(client, "tp", o.tasks, o.payload_bytes, self._timeout(o.tasks))
        used = merged(meter.stop())
        busy = system_busy_seconds() - busy_before
        stack.check_alive()
        received = max(1, run.received)
        self.figures["throughput"][str(stack.workers)] = {
            "workers": stack.workers,
            "slots": o.slots,
            "tasks": o.tasks,
            "received": run.received,
            "failed": sum(not s.ok for s in run.samples),
            "elapsed_s": run.elapsed,
            "tasks_per_s": run.throughput,
            "cpu_us_per_task": {k: v / received * 1e6 for k, v in used.items()},
            "cpu_util_pct": {k: 100 * v / meter.wall for k, v in used.items()},
            "other_processes_pct": 100 * max(0.0, busy - sum(used.values())) / meter.wall,
        }
        say(f"   {run.received}/{o.tasks} in {run.elapsed:.2f} s: {run.throughput:.0f} tasks/s")

    async def profile(self, client: BenchClient, stack: Stack) -> None:
        """A closed-loop run like the measured one, under py-spy (a separate run: the profiler slows it)."""
        if py_spy_path() is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        assert self.o.profile is not None
        out = Path(self.o.profile) / "throughput"
        recorder = Recorder(self.procs, out, native=self.o.profile_native)
        recorder.start(stack.pids() | {"client": os.getpid()})
        try:
            await asyncio.sleep(0.5)  # py-spy attaches
            run = await closed_loop(client, "prof", self.o.profile_tasks, self.o.payload_bytes, 300)
        finally:
            profiles = await recorder.stop()
        self.figures["profile"] = {
            "what": f"closed loop, {self.o.profile_tasks} tasks, {stack.workers} workers",
            "tasks_per_s_under_profiler": run.throughput,
            "dir": str(out),
            "processes": {
                name: {"samples": p.samples, "self": p.top_self(12), "inclusive": p.top_total(20)}
                for name, p in profiles.items()
            },
        }

    async def curve(
        self, key: str, pids: dict[str, int], producers: Producers, trees: frozenset[str] = frozenset()
    ) -> None:
        """Open loop at every rate of --rates, one task per submit from every producer process."""
        points: list[Figures] = []
        self.figures["curves"][key] = points
        for rate in self.o.rates:
            meter = self._meter(pids, trees)
            name = f"{key.replace(' ', '')}-{rate:g}"
            run, used = await producers.run(name, rate, self.o.duration, self.log_dir, meter)
            points.append(_point(run, used, meter.wall, producers.count))
            say(f"   {rate:g}/s: submit→start {_brief(run)}")
            await asyncio.sleep(PAUSE)

    async def stall(self, stack: Stack, producers: Producers, key: str) -> None:
        """10 % of the workers stop reading: open loop at the lowest rate, against the curve's point at it."""
        o = self.o
        rate = min(o.rates)
        figures: Figures = {"workers": stack.workers, "stalled": len(stack.stalled_ids), "ack_timeout": o.ack_timeout}
        self.figures["stall"] = figures
        stalled = set(await stack.stall())
        healthy = _healthy(stalled)
        try:
            run, _ = await producers.run("stall", rate, o.duration, self.log_dir, CpuMeter({}))
        finally:
            await stack.resume()
        stack.check_alive()
        base = next((p for p in self.figures["curves"].get(key, []) if p["offered_per_s"] == rate), None)
        figures["open_loop"] = {
            "offered_per_s": rate,
            "submitted": run.submitted,
            "received": run.received,
            "healthy_receipt_ms": run.receipt(healthy).as_dict(),
            "all_receipt_ms": run.receipt().as_dict(),
            "baseline_receipt_p99_ms": base["receipt_ms"]["p99"] if base else None,
            "requeues": _requeue_figures(run),
        }
        say(f"   open loop {rate:g}/s, {len(stalled)} stalled: healthy submit→start {_brief(run, healthy)}")

    # Celery and Dramatiq.

    async def compare(self) -> None:
        """Each rival in turn, its own worker on its own queue: closed loop, then the open-loop curve."""
        runs: list[Figures] = []
        self.figures["rivals"] = {"runs": runs, "skipped": []}
        o = self.o
        for name in o.rivals:
            rival = rivals.RIVALS[name]
            if not rivals.available(rival):
                self.figures["rivals"]["skipped"].append(f"{name}: {rival.framework} is not installed")
                say(f"   {name} skipped: {rival.framework} is not installed (pip install -e '.[bench]')")
                continue
            queue = f"{o.prefix}-bench-{self.run_id}-{name}"
            replies = ["warm", "tp", *(f"p{i}" for i in range(o.producers))]
            self.rival_queues += rivals.queue_names(rival, queue, replies)
            url = self.broker.urls[0]
            worker = await rivals.start_worker(self.procs, rival, url, queue, o.payload_bytes, o.warmup)
            producers = Producers(
                self.procs,
                name,
                o.producers,
                env={"RABBITMQ_URL": url},
                payload_bytes=o.payload_bytes,
                tag=name,
                queue=queue,
            )
            try:
                if self.wanted("throughput"):
                    meter = self._meter({"workers": worker.child.pid, "client": os.getpid()}, frozenset({"workers"}))
                    run = await rivals.closed_loop(
                        worker, url, o.rival_tasks, o.payload_bytes, self._timeout(o.rival_tasks), meter
                    )
                    runs.append(run)
                    say(f"   {rival.label}: {run['received']}/{run['tasks']}, {run['tasks_per_s']:.0f} tasks/s")
                if self.wanted("latency"):
                    await producers.start()
                    pids = {"workers": worker.child.pid}
                    await self.curve(rival.label, pids, producers, trees=frozenset({"workers"}))
            finally:
                await producers.stop()
                await worker.stop()

    async def memory(self) -> None:
        o = self.o
        settle = 0.5 if o.quick else 2.0
        stack = Stack(self.procs, self.prefix("m"), "m", log_level=o.log_level)
        self.stacks.append(stack)
        try:
            dispatcher = await stack.start_dispatcher(ack_timeout=o.ack_timeout)
            await asyncio.sleep(settle)
            before = await _steady_rss(dispatcher.pid, gap=settle / 5)
            started = time.monotonic()
            await stack.start_fleets(o.idle_streams, 1, o.slots, name="idle", ready_timeout=180, ramp=0)
            connect_s = time.monotonic() - started
            await asyncio.sleep(settle)
            after = await _steady_rss(dispatcher.pid, gap=settle / 5)
            meter = CpuMeter({"dispatcher": dispatcher.pid})
            meter.start()
            await asyncio.sleep(settle * 1.5)
            idle_cpu = meter.stop()["dispatcher"] / meter.wall
            stack.check_alive()
        finally:
            await stack.stop()
        self.figures["memory"] = {
            "streams": o.idle_streams,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "bytes_per_stream": (after - before) / o.idle_streams,
            "connect_s": connect_s,
            "idle_cpu_pct": 100 * idle_cpu,
            "ramp": 0,
        }
        say(f"   {o.idle_streams} streams: {(after - before) / o.idle_streams / 1024:.1f} KiB each")

    async def clean(self) -> None:
        await self.procs.stop_all()
        for stack in self.stacks:
            await stack.clean()
        # Celery declares an exchange named like its queue; Dramatiq declares none.
        await rivals.delete_queues(self.broker.urls[0], self.rival_queues, self.rival_queues)


def _point(run: RunResult, used: dict[str, float], wall: float, producers: int) -> Figures:
    """One point of a curve: what was offered, what the system kept up with, latency, CPU per task per process."""
    received = max(1, sum(s.started is not None for s in run.samples))
    return {
        "offered_per_s": run.offered_rate,
        "producers": producers,
        "submitted": run.submitted,
        "received": run.received,
        "started": sum(s.started is not None for s in run.samples),
        "started_per_s": started_rate(run),
        "producer_max_lag_ms": run.send_lag_ms,
        "receipt_ms": run.receipt().as_dict(),
        "result_ms": run.result().as_dict(),
        "cpu_us_per_task": {k: v / received * 1e6 for k, v in used.items()},
        "cpu_util_pct": {k: 100 * v / wall for k, v in used.items()},
    }


def _healthy(stalled: set[str]) -> Callable[[Sample], bool]:
    """A task that never went near a stalled worker: done by a healthy one on its first attempt."""
    return lambda s: s.worker_id not in stalled and not s.reasons


def _brief(run: RunResult, keep: Callable[[Sample], bool] = lambda s: True) -> str:
    d = run.receipt(keep)
    return f"p50 {d.p50:.1f} / p99 {d.p99:.1f} / max {d.max:.1f} ms over {d.count}/{run.submitted}"


def _requeue_figures(run: RunResult) -> Figures:
    requeued = [s for s in run.samples if s.requeued_at is not None]
    gaps = [(s.started - s.requeued_at) * 1000 for s in requeued if s.started is not None and s.requeued_at]
    reasons: dict[str, int] = {}
    for s in requeued:
        for r in s.reasons:
            reasons[r] = reasons.get(r, 0) + 1
    return {"tasks": len(requeued), "reasons": reasons, "requeue_to_receipt_ms": Distribution.of(gaps).as_dict()}


async def _steady_rss(pid: int, samples: int = 5, gap: float = 0.3) -> int:
    values = []
    for _ in range(samples):
        values.append(rss_bytes(pid))
        await asyncio.sleep(gap)
    return sorted(values)[len(values) // 2]


async def run(args: Any) -> int:
    """Run the benchmark from parsed arguments; returns the exit code (2 for bad options)."""
    try:
        options = resolve(args)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    broker = load(BrokerSettings)
    log_dir = Path(options.log_dir or tempfile.mkdtemp(prefix="sluicegate-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    run_id = uuid.uuid4().hex[:8]
    bench = Bench(options, broker, Processes(log_dir, run_id), run_id, log_dir)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    interrupted = False
    say(f"bench: run {run_id}, logs in {log_dir}")
    if options.wait_quiet and not await wait_until_quiet(options.wait_quiet):
        say(f"   the machine did not go quiet within {options.wait_quiet:.0f} s; measuring anyway")
    about = meta.metadata(options, meta.command_line(), await broker_version(broker.urls[0]))
    bench.figures["meta"] = about | {"run_id": run_id}
    try:
        if any(bench.wanted(p) for p in ("throughput", "latency", "stall")):
            await bench.phase(
                f"Sluicegate, {options.workers} workers", lambda: bench.fleet(options.workers, "a", main=True)
            )
        if bench.wanted("rivals") and options.rivals:
            await bench.phase("Celery and Dramatiq", bench.compare)
        if bench.wanted("many"):
            await bench.phase(
                f"Sluicegate, {options.many_workers} workers",
                lambda: bench.fleet(options.many_workers, "b", main=False),
            )
        if bench.wanted("memory"):
            await bench.phase(f"memory ({options.idle_streams} idle streams)", bench.memory)
    except asyncio.CancelledError:
        interrupted = True
        say("interrupted; stopping every process and deleting the run's queues")
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
        await asyncio.shield(bench.clean())
    figures = bench.figures
    print(report.table(figures))
    if options.json_path:
        report.write_json(figures, Path(options.json_path))
    if options.record and not interrupted:
        say(f"recorded in {record.record(figures, Path(options.record))}")
    if interrupted:
        return 130
    return 1 if figures["errors"] else 0
