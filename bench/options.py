"""The benchmark's command-line options and the sizes of a full and a quick run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from bench.rivals import RIVALS

# Sizes of a full run, and of `--quick` (a smoke run of a minute or two).
FULL: dict[str, Any] = {
    "tasks": 20_000,
    "warmup": 1_000,
    "many_workers": 200,
    "idle_streams": 1_000,
    "duration": 10.0,
    "rates": "100,200,400,800",
    "rival_tasks": 10_000,
    "rivals": "celery-threads,celery-prefork,dramatiq",
    "ack_timeout": "5s",
    "profile_tasks": 10_000,
}
QUICK: dict[str, Any] = {
    "tasks": 400,
    "warmup": 100,
    "many_workers": 40,
    "idle_streams": 100,
    "duration": 2.0,
    "rates": "50,100",
    "rival_tasks": 400,
    "rivals": "celery-threads,dramatiq",
    "ack_timeout": "1s",
    "profile_tasks": 400,
}
PHASES = ("throughput", "latency", "stall", "rivals", "many", "memory")


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
    rates: list[float]
    producers: int
    payload_bytes: int
    rival_tasks: int
    rivals: list[str]
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
    wait_quiet: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    size = parser.add_argument_group("sizes (defaults: a full run; --quick shrinks them)")
    size.add_argument("--quick", action="store_true", help="a small smoke run")
    size.add_argument("--tasks", type=int, help="tasks in each closed loop (full 20000, quick 400)")
    size.add_argument("--warmup", type=int, help="tasks pushed through before measuring (full 1000)")
    size.add_argument("--workers", type=int, default=20, help="workers of the main fleet (20)")
    size.add_argument("--many-workers", type=int, help="workers of the second fleet (full 200)")
    size.add_argument("--idle-streams", type=int, help="idle streams for the memory figure (full 1000)")
    size.add_argument("--slots", type=int, default=10, help="slots per worker (10)")
    size.add_argument("--rates", help="open-loop rates, tasks/s, comma-separated (full 100,200,400,800)")
    size.add_argument("--duration", type=float, help="seconds of each open-loop rate (full 10)")
    size.add_argument("--producers", type=int, default=4, help="open-loop producer processes (4)")
    size.add_argument("--payload-bytes", type=int, default=512)
    size.add_argument("--rival-tasks", type=int, help="tasks in each Celery and Dramatiq closed loop (full 10000)")
    size.add_argument(
        "--rivals", help=f"comma-separated: {', '.join(RIVALS)} (full all, quick celery-threads,dramatiq; '' none)"
    )
    size.add_argument("--ack-timeout", help="dispatcher receipt deadline (full 5s as deployed; quick 1s)")
    size.add_argument("--stall-fraction", type=float, default=0.1, help="share of workers that stop reading")
    size.add_argument("--skip", default="", help=f"comma-separated phases to leave out: {', '.join(PHASES)}")
    out = parser.add_argument_group("output")
    out.add_argument("--profile", metavar="DIR", help="also profile a closed loop with py-spy; stacks to DIR")
    out.add_argument("--profile-tasks", type=int, help="tasks in the profiled run (full 10000)")
    out.add_argument("--profile-native", action="store_true", help="let py-spy unwind native frames too (slower)")
    out.add_argument(
        "--record",
        nargs="?",
        const="BENCHMARKS.md",
        metavar="FILE",
        help="append this run as a row of the results table in FILE (default BENCHMARKS.md)",
    )
    out.add_argument("--json", dest="json_path", metavar="FILE", help="write every figure as JSON to FILE")
    out.add_argument("--log-dir", help="where the child processes log (default: a new temporary directory)")
    out.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be nearly idle (it is shared with the broker)",
    )
    parser.add_argument("--prefix", help="base of the run's unique queue and exchange prefix (sluicegate)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default WARNING")


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def resolve(args: argparse.Namespace) -> Options:
    """Options from parsed arguments, filling sizes from FULL or QUICK; ValueError names a bad one."""
    sizes = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return sizes[name] if value is None else value

    rivals = _list(str(pick("rivals")))
    if bad := [r for r in rivals if r not in RIVALS]:
        raise ValueError(f"unknown rival {bad[0]!r}; rivals are {', '.join(RIVALS)}")
    skip = set(_list(args.skip or ""))
    if bad := sorted(skip - set(PHASES)):
        raise ValueError(f"unknown phase {bad[0]!r}; phases are {', '.join(PHASES)}")
    try:
        rates = [float(r) for r in _list(str(pick("rates")))]
    except ValueError:
        raise ValueError("--rates must be numbers, comma-separated") from None
    options = Options(
        quick=args.quick,
        tasks=int(pick("tasks")),
        warmup=int(pick("warmup")),
        workers=args.workers,
        many_workers=int(pick("many_workers")),
        idle_streams=int(pick("idle_streams")),
        slots=args.slots,
        duration=float(pick("duration")),
        rates=rates,
        producers=args.producers,
        payload_bytes=args.payload_bytes,
        rival_tasks=int(pick("rival_tasks")),
        rivals=rivals,
        ack_timeout=str(pick("ack_timeout")),
        stall_fraction=args.stall_fraction,
        prefix=args.prefix or "sluicegate",
        profile=args.profile,
        profile_tasks=int(pick("profile_tasks")),
        profile_native=args.profile_native,
        record=args.record,
        json_path=args.json_path,
        log_dir=args.log_dir,
        log_level=args.log_level or "WARNING",
        skip=skip,
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
        (bool(rates) and all(1 <= r <= 100_000 for r in rates), "--rates must be between 1 and 100000 tasks/s"),
        (1 <= options.producers <= 32, "--producers must be between 1 and 32"),
        (8 <= options.payload_bytes <= 1_000_000, "--payload-bytes must be between 8 and 1000000"),
        (0 < options.stall_fraction < 1, "--stall-fraction must be between 0 and 1"),
        (1 <= options.rival_tasks <= 1_000_000, "--rival-tasks must be between 1 and 1000000"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return options
