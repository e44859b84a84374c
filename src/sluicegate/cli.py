"""The `sluicegate` command: run a scheduler, a dispatcher, a recorder or a demo worker; submit and look up tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from importlib import metadata
from typing import Any

from sluicegate.cli_base import (
    HelpFormatter,
    Parser,
    add_common,
    add_common_everywhere,
    add_parser,
    check_metrics,
    duration,
    observed,
    stop_on_signals,
    traced,
)
from sluicegate.cli_base import broker as _broker
from sluicegate.errors import InvalidInput, PermanentError, SluicegateError
from sluicegate.logs import configure
from sluicegate.settings import LogSettings, load
from sluicegate.validation import parse_labels


@traced("scheduler")
async def cmd_scheduler(args: argparse.Namespace) -> int:
    from sluicegate_scheduler.app import Scheduler
    from sluicegate_scheduler.settings import SchedulerSettings

    settings = load(SchedulerSettings, max_dispatch_attempts=args.max_dispatch_attempts)
    check_metrics()
    stop = stop_on_signals()
    scheduler = Scheduler(settings, _broker(args))
    async with scheduler, observed(scheduler.metrics.registry, lambda: scheduler.ready):
        await stop.wait()
    return 0


@traced("dispatcher")
async def cmd_dispatcher(args: argparse.Namespace) -> int:
    from sluicegate.lifecycle import LifecycleSettings
    from sluicegate_dispatcher.app import Dispatcher
    from sluicegate_dispatcher.settings import DispatcherSettings

    settings = load(
        DispatcherSettings,
        id=args.id,
        listen=args.listen,
        send_lock_timeout=args.send_lock_timeout,
        ack_timeout=args.ack_timeout,
        drain_grace=args.drain_grace,
        insecure=args.insecure,
    )
    check_metrics()
    stop = stop_on_signals()
    dispatcher = Dispatcher(settings, _broker(args), lifecycle_settings=load(LifecycleSettings))
    async with dispatcher, observed(dispatcher.metrics.registry, lambda: dispatcher.ready):
        await stop.wait()
    return 0


def demo_worker(dispatchers: str | None, slots: int | None, worker_id: str = "", settings: Any = None) -> Any:
    """A worker with the demo actions: `echo` returns its payload, `sleep` waits, `fail` fails."""
    from sluicegate.worker import TaskContext, Worker

    worker = Worker(dispatchers, slots=slots, worker_id=worker_id, settings=settings)

    @worker.action("echo")
    async def echo(ctx: TaskContext) -> bytes:
        return ctx.payload

    @worker.action("sleep")
    async def sleep(ctx: TaskContext) -> bytes:
        data = ctx.json()
        seconds = data.get("seconds", 1) if isinstance(data, dict) else data
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
            raise PermanentError('sleep takes {"seconds": N} with N between 0 and 3600')
        await asyncio.sleep(seconds)
        return ctx.payload

    @worker.action("fail")
    async def fail(ctx: TaskContext) -> bytes:
        raise RuntimeError("failed on purpose")

    return worker


@traced("worker")
async def cmd_worker(args: argparse.Namespace) -> int:
    from sluicegate.worker import WorkerSettings

    # Flags replace SLUICEGATE_WORKER_LABELS as a whole, as every flag replaces its variable.
    labels = parse_labels(args.label) if args.label else None
    settings = load(WorkerSettings, dispatchers=args.dispatchers, slots=args.slots, tenant=args.tenant, labels=labels)
    check_metrics()
    worker = demo_worker(None, None, args.worker_id or "", settings)
    stop = stop_on_signals()
    async with worker, observed(worker.metrics(), worker.registered.is_set):
        await stop.wait()
    return 0


@traced("client")
async def cmd_submit(args: argparse.Namespace) -> int:
    from sluicegate.client import Client, TaskSpec
    from sluicegate.report import Progress, summarize

    try:
        payload = json.loads(args.payload) if args.payload is not None else None
    except json.JSONDecodeError as err:
        raise InvalidInput(f"payload is not valid JSON ({err.msg} at position {err.pos})") from err
    if not 1 <= args.count <= 1_000_000:
        raise InvalidInput("--count must be between 1 and 1000000")
    if args.spread and args.partition_key:
        raise InvalidInput("--spread and --partition-key exclude each other")
    spec = dict(
        action=args.action,
        payload=payload,
        priority=args.priority,
        max_retries=args.max_retries,
        tenant=args.tenant,
        delay=duration(args.delay, "--delay"),
        schedule_timeout=duration(args.schedule_timeout, "--schedule-timeout"),
        fairness_key=args.fairness_key,
        concurrency_key=args.concurrency_key,
        sticky_key=args.sticky_key,
        labels=parse_labels(args.label) if args.label else {},
    )
    async with Client(_broker(args)) as client:
        started = time.monotonic()
        keys = [f"{uuid.uuid4().hex[:8]}-{i}" if args.spread else args.partition_key for i in range(args.count)]
        ids = await client.submit_many([TaskSpec(**spec, partition_key=key) for key in keys])
        print(f"submitted {len(ids)} task(s) of {args.action!r}", file=sys.stderr)
        if args.no_wait:
            for task_id in ids:
                print(task_id)
            return 0
        progress = Progress(len(ids), sys.stderr)
        results = await progress.collect(client, ids, args.timeout)
        print(summarize(results, len(ids), time.monotonic() - started))
        if args.count == 1 and results:
            (result,) = results.values()
            print(result.output.decode(errors="replace") or result.error)
        return 0 if len(results) == len(ids) and all(r.status == 1 for r in results.values()) else 1


@traced("demo")
async def cmd_demo(args: argparse.Namespace) -> int:
    from sluicegate.demo import run_demo

    demo = asyncio.create_task(
        run_demo(
            _broker(args),
            workers=args.workers,
            tasks=args.tasks,
            payload_bytes=args.payload_bytes,
            stall=not args.no_stall,
            rate=args.rate,
        )
    )
    stop = asyncio.create_task(stop_on_signals().wait())
    await asyncio.wait({demo, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not demo.done():
        # Interrupted: cancel it so that its clean-up (queues and exchanges it declared) still runs.
        demo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await demo
        print("sluicegate: demo interrupted", file=sys.stderr)
        return 130
    stop.cancel()
    return demo.result()


def version() -> str:
    try:
        return metadata.version("sluicegate")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sluicegate", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sluicegate {version()}")
    add_common(parser, at_top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_parser(commands, "scheduler", "assign submitted tasks to workers")
    p.add_argument(
        "--max-dispatch-attempts",
        type=int,
        help="dispatch attempts before a task is dead (default: SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS, else 5)",
    )
    p.set_defaults(run=cmd_scheduler)

    p = add_parser(commands, "dispatcher", "serve worker streams and forward assignments to them")
    p.add_argument("--id", help="inbox routing key (default: SLUICEGATE_DISPATCHER_ID, else host name + random)")
    p.add_argument("--listen", help="gRPC host:port (default: SLUICEGATE_DISPATCHER_LISTEN, else 127.0.0.1:50051)")
    p.add_argument("--send-lock-timeout", help="longest wait for a worker's send lock, e.g. 250ms (default: 250ms)")
    p.add_argument("--ack-timeout", help="a worker must acknowledge receipt within this, e.g. 5s (default: 2s)")
    p.add_argument("--drain-grace", help="on SIGTERM, how long running tasks may finish, e.g. 10s (default: 10s)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="listen beyond loopback without TLS and credentials (default: SLUICEGATE_DISPATCHER_INSECURE, else off)",
    )
    p.set_defaults(run=cmd_dispatcher)

    p = add_parser(commands, "worker", "run a demo worker (actions echo, sleep, fail)")
    p.add_argument(
        "--dispatchers",
        help="host:port list (default: SLUICEGATE_WORKER_DISPATCHERS, else 127.0.0.1:50051)",
    )
    p.add_argument("--slots", type=int, help="tasks run at once (default: SLUICEGATE_WORKER_SLOTS, else 10)")
    p.add_argument("--tenant", help="tenant whose tasks it takes (default: SLUICEGATE_WORKER_TENANT, else default)")
    p.add_argument("--worker-id", help="the worker's stable name (default: chosen by the dispatcher)")
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label the worker carries; repeatable, replaces SLUICEGATE_WORKER_LABELS (default: none)",
    )
    p.set_defaults(run=cmd_worker)

    p = add_parser(commands, "submit", "submit tasks and wait for their results")
    p.add_argument("action", help="the action (handler name) to run")
    p.add_argument("payload", nargs="?", help="JSON payload (default: none)")
    p.add_argument("--count", type=int, default=1, help="how many tasks like this")
    p.add_argument("--tenant", default="default", help="tenant whose workers run it")
    p.add_argument("--priority", type=int, default=0, help="0-9, higher is assigned first")
    p.add_argument("--delay", help="not assigned before this from now, e.g. 5s or 2m (default: at once)")
    p.add_argument(
        "--schedule-timeout", help="not started within this after submission: ends expired, e.g. 30s (default: none)"
    )
    p.add_argument("--fairness-key", default="", help="share workers fairly across these keys (default: none)")
    p.add_argument("--concurrency-key", default="", help="key the scheduler's concurrency limits count (default: none)")
    p.add_argument("--sticky-key", default="", help="tasks with one key go to the same worker (default: none)")
    p.add_argument(
        "--partition-key", default="", help="pick the scheduler partition by this, not the tenant (default: none)"
    )
    p.add_argument("--spread", action="store_true", help="spread the tasks over every scheduler partition")
    p.add_argument(
        "--label", action="append", help="a label the worker must carry, key=value, repeatable (default: none)"
    )
    p.add_argument("--max-retries", type=int, help="default: the worker's default for the action, else 0")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all results")
    p.add_argument("--no-wait", action="store_true", help="print the task ids and return")
    p.set_defaults(run=cmd_submit)

    from sluicegate.cli_dead import add_commands as add_dead_commands
    from sluicegate.cli_ops import add_commands as add_ops_commands
    from sluicegate.cli_records import add_commands as add_record_commands

    add_record_commands(commands)
    add_ops_commands(commands)
    add_dead_commands(commands)

    from sluicegate.cli_token import add_commands as add_token_commands

    add_token_commands(commands)

    p = add_parser(commands, "demo", "run the whole pipeline locally with a worker that stalls")
    p.add_argument("--workers", type=int, default=4, help="workers, one of which goes deaf")
    p.add_argument("--tasks", type=int, default=3000, help="tasks submitted")
    p.add_argument("--payload-bytes", type=int, default=8 * 1024, help="bytes of each task's payload")
    p.add_argument("--rate", type=int, default=300, help="tasks submitted per second")
    p.add_argument("--no-stall", action="store_true", help="keep every worker healthy")
    p.set_defaults(run=cmd_demo)

    add_common_everywhere(parser)
    return parser


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on some platforms
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure(load(LogSettings, level=args.log_level, json_format=args.log_json))
        return _run(args.run(args))
    except InvalidInput as err:
        print(f"sluicegate: {err}", file=sys.stderr)
        return 2
    except SluicegateError as err:
        print(f"sluicegate: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`sluicegate dead list | head`)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
