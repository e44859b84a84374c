"""The benchmark's command-line options (kept light: `sluicegate --help` imports this, nothing heavy)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

# Sizes of a full run, and of `--quick` (a smoke run that finishes well inside a minute).
FULL: dict[str, Any] = {
    "tasks": 20_000,
    "warmup": 1_000,
    "workers": 20,
    "many_workers": 200,
    "idle_streams": 1_000,
    "duration": 10.0,
    "celery_tasks": 10_000,
    "celery_pools": "threads,prefork",
    "ack_timeout": "5s",
    "profile_tasks": 10_000,
    "sweep": "50,100,200",
}
QUICK: dict[str, Any] = {
    "tasks": 400,
    "warmup": 100,
    "workers": 20,
    "many_workers": 40,
    "idle_streams": 100,
    "duration": 2.0,
    "celery_tasks": 400,
    "celery_pools": "threads",
    "ack_timeout": "1s",
    "profile_tasks": 400,
    "sweep": "",
}


@dataclass(slots=True)
class Options:
    quick: bool
    tasks: int
    warmup: int
    workers: int
    many_workers: int
    idle_streams: int
    slots: int
    duration: float
    rate: float | None
    payload_bytes: int
    fleet_procs: int | None
    celery_tasks: int
    celery_pools: list[str]
    celery_threads: int
    celery_processes: int
    ack_timeout: str
    stall_fraction: float
    prefix: str
    profile: str | None
    profile_tasks: int
    profile_native: bool
    record: str | None
    json_path: str | None
    log_dir: str | None
    log_level: str
    skip: set[str]
    sweep: list[float]
    wait_quiet: float

    def fleets_for(self, workers: int) -> int:
        return self.fleet_procs or (1 if workers <= 50 else 2)


PHASES = ("lock", "throughput", "latency", "stall", "celery", "many", "memory")


def add_arguments(parser: argparse.ArgumentParser, *, standalone: bool = False) -> None:
    """Add the benchmark's options; `standalone` adds the ones the `sluicegate` command has globally."""
    size = parser.add_argument_group("sizes (defaults: a full run; --quick shrinks them)")
    size.add_argument(
        "--quick", action="store_true", help="a tiny smoke run, well under a minute (default: a full run)"
    )
    size.add_argument("--tasks", type=int, help="tasks in each throughput run (default: 20000, quick 400)")
    size.add_argument("--warmup", type=int, help="tasks pushed through before measuring (default: 1000, quick 100)")
    size.add_argument("--workers", type=int, help="worker streams of the main scenario (default: 20)")
    size.add_argument("--many-workers", type=int, help="streams of the second latency run (default: 200, quick 40)")
    size.add_argument("--idle-streams", type=int, help="idle streams for the memory figure (default: 1000, quick 100)")
    size.add_argument("--slots", type=int, default=10, help="slots per worker")
    size.add_argument("--duration", type=float, help="seconds of each open-loop latency run (default: 10, quick 2)")
    size.add_argument("--rate", type=float, help="offered tasks/s of the latency runs (default: half the capacity)")
    size.add_argument(
        "--sweep", help="extra open-loop rates, tasks/s, comma-separated (default: 50,100,200, quick none)"
    )
    size.add_argument("--payload-bytes", type=int, default=512, help="bytes of each task's payload")
    size.add_argument("--fleet-procs", type=int, help="worker processes per scenario (default 1, or 2 over 50)")
    size.add_argument("--celery-tasks", type=int, help="tasks in each Celery run (default: 10000, quick 400)")
    size.add_argument("--celery-pools", help="comma-separated: threads, prefork (default: both, quick threads)")
    size.add_argument("--celery-threads", type=int, default=20, help="threads of the Celery thread pool")
    size.add_argument("--celery-processes", type=int, default=2, help="processes of the Celery prefork pool")
    size.add_argument("--ack-timeout", help="dispatcher receipt deadline (default: 5s as deployed, quick 1s)")
    size.add_argument("--stall-fraction", type=float, default=0.1, help="share of workers that stop reading")
    size.add_argument("--skip", default="", help=f"phases to leave out (default: none): {', '.join(PHASES)}")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--profile",
        metavar="DIR",
        help="profile a throughput run with py-spy, stacks to DIR (default: none)",
    )
    out.add_argument("--profile-tasks", type=int, help="tasks in the profiled run (default: 10000, quick 400)")
    out.add_argument("--profile-native", action="store_true", help="let py-spy unwind native frames too (slower)")
    out.add_argument(
        "--record",
        nargs="?",
        const="BENCHMARKS.md",
        metavar="FILE",
        help="append this run as a row of the results table in FILE (default BENCHMARKS.md)",
    )
    out.add_argument("--json", dest="json_path", metavar="FILE", help="every figure as JSON to FILE (default: none)")
    out.add_argument("--log-dir", help="where the child processes log (default: a new temporary directory)")
    out.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be nearly idle (it is shared with the broker)",
    )
    if standalone:
        parser.add_argument("--prefix", help="base of the run's unique queue and exchange prefix (sluicegate)")
        parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default WARNING")


def resolve(args: argparse.Namespace) -> Options:
    """Options from parsed arguments, filling sizes from FULL or QUICK."""
    sizes = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return sizes[name] if value is None else value

    pools = [p.strip() for p in str(pick("celery_pools")).split(",") if p.strip()]
    bad = [p for p in pools if p not in ("threads", "prefork")]
    if bad:
        raise ValueError(f"unknown Celery pool {bad[0]!r}; use threads or prefork")
    skip = {s.strip() for s in (args.skip or "").split(",") if s.strip()}
    if skip - set(PHASES):
        raise ValueError(f"unknown phase {sorted(skip - set(PHASES))[0]!r}; phases are {', '.join(PHASES)}")
    options = Options(
        quick=args.quick,
        tasks=int(pick("tasks")),
        warmup=int(pick("warmup")),
        workers=int(pick("workers")),
        many_workers=int(pick("many_workers")),
        idle_streams=int(pick("idle_streams")),
        slots=args.slots,
        duration=float(pick("duration")),
        rate=args.rate,
        payload_bytes=args.payload_bytes,
        fleet_procs=args.fleet_procs,
        celery_tasks=int(pick("celery_tasks")),
        celery_pools=pools,
        celery_threads=args.celery_threads,
        celery_processes=args.celery_processes,
        ack_timeout=str(pick("ack_timeout")),
        stall_fraction=args.stall_fraction,
        prefix=getattr(args, "prefix", None) or "sluicegate",
        profile=args.profile,
        profile_tasks=int(pick("profile_tasks")),
        profile_native=args.profile_native,
        record=args.record,
        json_path=args.json_path,
        log_dir=args.log_dir,
        log_level=getattr(args, "log_level", None) or "WARNING",
        skip=skip,
        sweep=[float(r) for r in str(pick("sweep")).split(",") if r.strip()],
        wait_quiet=args.wait_quiet,
    )
    checks = [
        (1 <= options.tasks <= 1_000_000, "--tasks must be between 1 and 1000000"),
        (0 <= options.warmup <= 100_000, "--warmup must be between 0 and 100000"),
        (2 <= options.workers <= 1000, "--workers must be between 2 and 1000"),
        (1 <= options.many_workers <= 2000, "--many-workers must be between 1 and 2000"),
        (1 <= options.idle_streams <= 5000, "--idle-streams must be between 1 and 5000"),
        (1 <= options.slots <= 1000, "--slots must be between 1 and 1000"),
        (0.2 <= options.duration <= 600, "--duration must be between 0.2 and 600 seconds"),
        (options.rate is None or 1 <= options.rate <= 100_000, "--rate must be between 1 and 100000"),
        (8 <= options.payload_bytes <= 1_000_000, "--payload-bytes must be between 8 and 1000000"),
        (options.fleet_procs is None or 1 <= options.fleet_procs <= 16, "--fleet-procs must be between 1 and 16"),
        (0 < options.stall_fraction < 1, "--stall-fraction must be between 0 and 1"),
        (1 <= options.celery_tasks <= 1_000_000, "--celery-tasks must be between 1 and 1000000"),
        (all(1 <= r <= 100_000 for r in options.sweep), "--sweep rates must be between 1 and 100000"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return options
