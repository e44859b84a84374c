"""The benchmark run: every phase in turn, each on its own prefix, every process stopped and every name deleted.

Phases (each can be skipped with --skip):
  throughput  20 workers: closed-loop throughput with CPU per task per process (and the py-spy profile)
  latency     open loop at half the capacity, 20 streams
  stall       10 % of the workers stop reading: open loop as above, then closed loop
  rivals      the throughput workload through Celery and Dramatiq (each skipped when not installed)
  many        open loop at the same rate over 200 streams
  memory      dispatcher RSS before and after 1,000 idle streams
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import report, rivals
from bench.options import Options
from bench.procs import CpuMeter, Processes, find_broker_pid, rss_bytes
from bench.profiling import Recorder, py_spy_path
from bench.rivals import RIVALS
from bench.runs import (
    BenchClient,
    Distribution,
    RunResult,
    Sample,
    broker_version,
    closed_loop,
    open_loop,
)
from bench.stack import Stack
from sluicegate.settings import BrokerSettings, load

Figures = dict[str, Any]
COOLDOWN_WAIT = 6.0  # the scheduler's default worker cool-down (5 s) has passed after this
# Workers connect this many at a time: all 1,000 at once overwhelm the dispatcher (sessions are
# dropped before their streams open, within the 500 ms reconnect grace, and register again).
RAMP = 50
QUICK_COOLDOWN_WAIT = 1.5  # with the 1 s cool-down a quick run gives its scheduler


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def system_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def wait_until_quiet(limit: float, *, busy_below: float = 0.15, window: float = 3.0) -> bool:
    """Wait (at most `limit` seconds) until the machine has been nearly idle for three windows in a row."""
    cores = os.cpu_count() or 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    quiet = 0
    while loop.time() < deadline:
        before = system_busy_seconds()
        await asyncio.sleep(window)
        share = (system_busy_seconds() - before) / (window * cores)
        quiet = quiet + 1 if share < busy_below else 0
        if quiet >= 3:
            return True
    say(f"   the machine did not go quiet within {limit:.0f} s; measuring anyway")
    return False


class Bench:
    def __init__(self, options: Options, broker: BrokerSettings, procs: Processes, run_id: str) -> None:
        self.o = options
        self.broker = broker
        self.procs = procs
        self.run_id = run_id
        self.figures: Figures = {"errors": {}}
        self.stacks: list[Stack] = []
        self.rival_queues: list[str] = []
        self.capacity: float | None = None
        self.baseline: RunResult | None = None
        self.baseline_throughput: RunResult | None = None
        self.sweep_runs: dict[float, RunResult] = {}

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

    # Phases.

    async def main_scenario(self) -> None:
        """20 workers: throughput, the profiled run, the latency baseline, then the stall."""
        o = self.o
        stall_count = max(1, round(o.workers * o.stall_fraction))
        stack = Stack(self.procs, self.prefix("a"), "a", log_level=o.log_level)
        self.stacks.append(stack)
        try:
            stack.start_scheduler(self._scheduler_env())
            await stack.start_dispatcher(ack_timeout=o.ack_timeout)
            await stack.start_fleets(o.workers, o.fleets_for(o.workers), o.slots, stall_count=stall_count)
            client = BenchClient(stack.broker)
            async with client:
                await self._warm_up(client, stack)
                if self.wanted("throughput"):
                    await self.phase("throughput", lambda: self.throughput(client, stack))
                if o.profile and self.wanted("throughput"):
                    await self.phase("profile", lambda: self.profile(client, stack))
                if self.wanted("latency") or self.wanted("stall"):
                    await self.phase(f"latency ({o.workers} streams)", lambda: self.latency(client, stack, main=True))
                if self.o.sweep and self.wanted("latency"):
                    await self.phase("rate sweep", lambda: self.sweep(client, stack))
                if self.wanted("stall"):
                    await self.phase("stall", lambda: self.stall(client, stack))
        finally:
            await stack.stop()

    async def _warm_up(self, client: BenchClient, stack: Stack) -> None:
        if self.o.warmup:
            run = await closed_loop(client, "warm", self.o.warmup, self.o.payload_bytes, 120)
            if run.received < self.o.warmup:
                raise RuntimeError(f"warm-up: {run.received} of {self.o.warmup} results within 120 s")
        stack.check_alive()

    def _timeout(self, tasks: int) -> float:
        return 60.0 + tasks / 50  # generous: a run that needs it is reported as incomplete, not hung

    async def throughput(self, client: BenchClient, stack: Stack) -> None:
        o = self.o
        meter = CpuMeter(self._pids(stack))
        busy_before = system_busy_seconds()
        meter.start()
        run = await closed_loop(client, "tp", o.tasks, o.payload_bytes, self._timeout(o.tasks))
        used = meter.stop()
        busy = system_busy_seconds() - busy_before
        stack.check_alive()
        self.baseline_throughput = run
        self.capacity = run.throughput
        per_process = _merge_workers(used)
        received = max(1, run.received)
        self.figures["throughput"] = {
            "workers": o.workers,
            "slots": o.slots,
            "fleet_procs": o.fleets_for(o.workers),
            "tasks": o.tasks,
            "received": run.received,
            "failed": sum(not s.ok for s in run.samples),
            "elapsed_s": run.elapsed,
            "tasks_per_s": run.throughput,
            "result": run.result().as_dict(),
            "cpu_s": per_process,
            "cpu_us_per_task": {k: v / received * 1e6 for k, v in per_process.items()},
            "cpu_util_pct": {k: 100 * v / meter.wall for k, v in per_process.items()},
            "machine_busy_pct": 100 * busy / meter.wall,
            "other_processes_pct": 100 * max(0.0, busy - sum(used.values())) / meter.wall,
        }
        say(f"   {run.received}/{o.tasks} in {run.elapsed:.2f} s: {run.throughput:.0f} tasks/s")

    async def profile(self, client: BenchClient, stack: Stack) -> None:
        """A closed-loop run like the measured one, under py-spy (a separate run: the profiler slows it)."""
        tasks = self.o.profile_tasks
        await self._profiled(
            "throughput",
            f"closed loop, {tasks} tasks, {stack.workers} streams",
            stack,
            lambda: closed_loop(client, "prof", tasks, self.o.payload_bytes, 300),
        )

    async def _profiled(self, key: str, what: str, stack: Stack, body: Callable[[], Awaitable[RunResult]]) -> None:
        if py_spy_path() is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        assert self.o.profile is not None
        recorder = Recorder(self.procs, Path(self.o.profile) / key, native=self.o.profile_native)
        recorder.start(stack.pids() | {"client": os.getpid()})
        try:
            await asyncio.sleep(0.5)  # py-spy attaches
            run = await body()
        finally:
            profiles = await recorder.stop()
        self.figures.setdefault("profile", {})[key] = {
            "what": what,
            "tasks_per_s_under_profiler": run.throughput,
            "dir": str(Path(self.o.profile) / key),
            "processes": {
                name: {"samples": p.samples, "self": p.top_self(12), "inclusive": p.top_total(20)}
                for name, p in profiles.items()
            },
        }

    def _rate(self) -> float:
        if self.o.rate:
            return self.o.rate
        if self.capacity:
            return max(1.0, self.capacity / 2)
        raise RuntimeError("no capacity measured to take half of: give --rate")

    def _pids(self, stack: Stack) -> dict[str, int]:
        pids = stack.pids() | {"client": os.getpid()}
        broker_pid = find_broker_pid()
        if broker_pid is not None:
            pids["broker"] = broker_pid
        return pids

    async def _open_loop(
        self, client: BenchClient, stack: Stack, name: str, rate: float, *, extra_wait: float = 0.0
    ) -> tuple[RunResult, dict[str, float]]:
        """One open-loop run, with each process's CPU use during it (% of a core)."""
        meter = CpuMeter(self._pids(stack))
        busy_before = system_busy_seconds()
        meter.start()
        timeout = self._timeout(int(rate * self.o.duration)) + extra_wait
        run = await open_loop(client, name, rate, self.o.duration, self.o.payload_bytes, timeout)
        used = meter.stop()
        others = max(0.0, system_busy_seconds() - busy_before - sum(used.values()))
        stack.check_alive()
        return run, _merge_workers({k: 100 * v / meter.wall for k, v in used.items()}) | {
            "others": 100 * others / meter.wall
        }

    async def latency(self, client: BenchClient, stack: Stack, *, main: bool) -> None:
        rate = self._rate()
        run, cpu = await self._open_loop(client, stack, f"lat{stack.workers}", rate)
        if main:
            self.baseline = run
        figures = _latency_figures(run, stack.workers) | {"cpu_util_pct": cpu, "main": main}
        self.figures.setdefault("latency", {})[str(stack.workers)] = figures
        say(f"   {rate:.0f}/s x {self.o.duration:g} s: receipt {_brief(run)}")

    async def sweep(self, client: BenchClient, stack: Stack) -> None:
        """Open-loop latency at a few fixed rates: where the latency targets hold, and where they break."""
        rows = []
        for rate in self.o.sweep:
            run, cpu = await self._open_loop(client, stack, f"sweep{rate:g}", rate)
            self.sweep_runs[rate] = run
            rows.append(_latency_figures(run, stack.workers) | {"cpu_util_pct": cpu})
            say(f"   {rate:g}/s: receipt {_brief(run)}")
        self.figures["sweep"] = rows

    async def stall(self, client: BenchClient, stack: Stack) -> None:
        """10 % of the workers stop reading: open loop at half the capacity (and at the lowest sweep
        rate, where the baseline is not saturated), then closed loop; each against the run without."""
        o = self.o
        figures: Figures = {"workers": o.workers, "stalled": len(stack.stalled_ids), "ack_timeout": o.ack_timeout}
        self.figures["stall"] = figures
        rates: list[tuple[float, RunResult | None]] = [(self._rate(), self.baseline)]
        if o.sweep and min(o.sweep) in self.sweep_runs:
            rates.append((min(o.sweep), self.sweep_runs[min(o.sweep)]))
        runs = []
        for i, (rate, baseline) in enumerate(rates):
            if i:
                await self._back_in_rotation(stack)
            stalled = set(await stack.stall())
            healthy = _healthy(stalled)
            try:
                run, cpu = await self._open_loop(client, stack, f"stall{i}", rate, extra_wait=30)
            finally:
                await stack.resume()
            entry: Figures = {
                "offered_per_s": rate,
                "latency": _latency_figures(run, o.workers, keep=healthy) | {"cpu_util_pct": cpu},
                "latency_all": _latency_figures(run, o.workers),
                "requeues": _requeue_figures(run),
            }
            if baseline is not None:
                entry["baseline_receipt_p99_ms"] = baseline.receipt().p99
                entry["baseline_result_p99_ms"] = baseline.result().p99
            runs.append(entry)
            say(f"   open loop {rate:.0f}/s, {len(stalled)} stalled: healthy receipt {_brief(run, healthy)}")
        figures["open_loop"] = runs
        if not self.wanted("throughput"):
            return
        await self._back_in_rotation(stack)
        stalled = set(await stack.stall())
        healthy = _healthy(stalled)
        try:
            run = await closed_loop(client, "stalltp", o.tasks, o.payload_bytes, self._timeout(o.tasks) + 30)
        finally:
            await stack.resume()
        stack.check_alive()
        clean = [s for s in run.samples if healthy(s)]
        last = max((s.arrived for s in clean if s.arrived is not None), default=run.started_at)
        healthy_rate = len(clean) / (last - run.started_at) if last > run.started_at else 0.0
        figures["throughput"] = {
            "tasks": o.tasks,
            "received": run.received,
            "healthy_tasks": len(clean),
            "healthy_tasks_per_s": healthy_rate,
            "all_tasks_per_s": run.throughput,
            "baseline_tasks_per_s": self.capacity,
            "requeues": _requeue_figures(run),
        }
        say(
            f"   closed loop, {len(stalled)} stalled: healthy {healthy_rate:.0f} tasks/s (baseline {self.capacity:.0f})"
        )

    async def _back_in_rotation(self, stack: Stack) -> None:
        """Wait until the stalled workers have reconnected and their cool-down at the scheduler is over."""
        assert stack.watcher is not None
        await stack.watcher.wait_ready(stack.workers, 30)
        await asyncio.sleep(self._cooldown_wait())

    async def compare(self) -> None:
        """Each rival in turn, its own worker on its own queue: closed loop, with CPU per task."""
        runs: list[Figures] = []
        self.figures["rivals"] = {"runs": runs, "skipped": []}
        for name in self.o.rivals:
            rival = RIVALS[name]
            if not rivals.available(rival):
                self.figures["rivals"]["skipped"].append(f"{name}: {rival.framework} is not installed")
                say(f"   {name} skipped: {rival.framework} is not installed (pip install -e '.[bench]')")
                continue
            queue = f"{self.o.prefix}-bench-{self.run_id}-{name}"
            self.rival_queues += rivals.queue_names(rival, queue, ["warm", "tp"])
            url = self.broker.url
            worker = await rivals.start_worker(self.procs, rival, url, queue, self.o.payload_bytes, self.o.warmup)
            try:
                tasks = self.o.rival_tasks
                run = await rivals.closed_loop(worker, url, tasks, self.o.payload_bytes, self._timeout(tasks))
            finally:
                await worker.stop()
            runs.append(run)
            took = f"{run['received']}/{run['tasks']} in {run['elapsed_s']:.2f} s"
            say(f"   {rival.label}: {took}, {run['tasks_per_s']:.0f} tasks/s")

    async def many(self) -> None:
        o = self.o
        stack = Stack(self.procs, self.prefix("b"), "b", log_level=o.log_level)
        self.stacks.append(stack)
        try:
            stack.start_scheduler(self._scheduler_env())
            await stack.start_dispatcher(ack_timeout=o.ack_timeout)
            await stack.start_fleets(o.many_workers, o.fleets_for(o.many_workers), o.slots, ramp=RAMP)
            client = BenchClient(stack.broker)
            async with client:
                await self._warm_up(client, stack)
                await self.latency(client, stack, main=False)
                self.figures["latency"][str(o.many_workers)]["fleet_procs"] = o.fleets_for(o.many_workers)
                if o.profile:
                    rate = self._rate()
                    await self._profiled(
                        "many",
                        f"open loop, {rate:.0f}/s, {stack.workers} streams",
                        stack,
                        lambda: open_loop(client, "profmany", rate, o.duration, o.payload_bytes, 120),
                    )
        finally:
            await stack.stop()

    def _cooldown_wait(self) -> float:
        return QUICK_COOLDOWN_WAIT if self.o.quick else COOLDOWN_WAIT

    def _scheduler_env(self) -> dict[str, str]:
        # A quick run shortens the scheduler's cool-down of stalled workers so that the closed-loop
        # stall run need not wait the deployed 5 s for them to be back in rotation.
        return {"SLUICEGATE_SCHEDULER_WORKER_COOLDOWN": "1s"} if self.o.quick else {}

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
            await stack.start_fleets(o.idle_streams, 1, o.slots, name="idle", ready_timeout=180, ramp=RAMP)
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
            "connections": "one TCP connection per worker",
            "ramp": RAMP,
        }
        say(f"   {o.idle_streams} streams: {(after - before) / o.idle_streams / 1024:.1f} KiB each")

    async def clean(self) -> None:
        await self.procs.stop_all()
        for stack in self.stacks:
            await stack.clean()
        # Celery declares an exchange named like its queue; Dramatiq declares none.
        await rivals.delete_queues(self.broker.url, self.rival_queues, self.rival_queues)


def _merge_workers(values: dict[str, float]) -> dict[str, float]:
    """Per-process figures with every worker-fleet process summed as `workers`."""
    merged = {k: v for k, v in values.items() if not k.startswith("workers")}
    merged["workers"] = sum(v for k, v in values.items() if k.startswith("workers"))
    return merged


def _healthy(stalled: set[str]) -> Callable[[Sample], bool]:
    """A task that never went near a stalled worker: done by a healthy one on its first attempt."""
    return lambda s: s.worker_id not in stalled and not s.reasons


def _brief(run: RunResult, keep: Callable[[Sample], bool] = lambda s: True) -> str:
    d = run.receipt(keep)
    return f"p50 {d.p50:.1f} / p99 {d.p99:.1f} / max {d.max:.1f} ms over {d.count}"


def _latency_figures(run: RunResult, streams: int, keep: Callable[[Sample], bool] = lambda s: True) -> Figures:
    return {
        "streams": streams,
        "offered_per_s": run.offered_rate,
        "duration_s": run.submitted / run.offered_rate if run.offered_rate else math.nan,
        "submitted": run.submitted,
        "received": run.received,
        "producer_max_lag_ms": run.send_lag_ms,
        "requeued": sum(s.requeued_at is not None for s in run.samples if keep(s)),
        "receipt_ms": run.receipt(keep).as_dict(),
        "result_ms": run.result(keep).as_dict(),
    }


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


def _log_dir(given: str | None) -> Path:
    path = Path(given or tempfile.mkdtemp(prefix="sluicegate-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run(args: Any) -> int:
    """Run the benchmark from parsed arguments; returns the exit code (2 for bad options)."""
    from bench.options import resolve

    try:
        options = resolve(args)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    return await run_options(options, report.command_line())


async def run_options(options: Options, command: str) -> int:
    broker = load(BrokerSettings)
    log_dir = _log_dir(options.log_dir)
    run_id = uuid.uuid4().hex[:8]
    procs = Processes(log_dir, run_id)
    bench = Bench(options, broker, procs, run_id)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    interrupted = False
    say(f"bench: run {bench.run_id}, logs in {log_dir}")
    if options.wait_quiet:
        await wait_until_quiet(options.wait_quiet)
    bench.figures["meta"] = await report.metadata(options, command, await broker_version(broker.url))
    bench.figures["meta"]["run_id"] = run_id
    try:
        if any(bench.wanted(p) for p in ("throughput", "latency", "stall")):
            await bench.phase(f"main scenario ({options.workers} workers)", bench.main_scenario)
        if bench.wanted("rivals") and options.rivals:
            await bench.phase("Celery and Dramatiq", bench.compare)
        if bench.wanted("many"):
            await bench.phase(f"latency ({options.many_workers} streams)", bench.many)
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
        path = report.record(figures, Path(options.record))
        say(f"recorded in {path}")
    if interrupted:
        return 130
    return 1 if figures["errors"] else 0
