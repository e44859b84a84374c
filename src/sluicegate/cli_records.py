"""The task store's commands: `migrate`, `recorder`, `result TASK_ID`, `tasks` and `cancel TASK_ID`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sluicegate import amqp
from sluicegate.cli_base import add_parser, check_metrics, number, observed, stop_on_signals, traced
from sluicegate.cli_base import broker as _broker
from sluicegate.durations import parse_long_duration
from sluicegate.errors import InvalidInput
from sluicegate.settings import load
from sluicegate.store import StoreSettings, TaskState, TaskStore, db, schema, show
from sluicegate.store.reader import MAX_LIMIT, check_task_id


def _store() -> StoreSettings:
    settings = load(StoreSettings)
    if not settings.configured:
        raise InvalidInput("no task store is configured: set SLUICEGATE_STORE_URL")
    return settings


async def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _store()
    broker = _broker(args)
    pool = await db.create_pool(settings, max_size=1)
    try:
        await db.wait_until_reachable(pool, settings)
        async with pool.acquire() as connection:
            applied = await schema.migrate(connection)
            version = await schema.current_version(connection)
    except db.STORE_ERRORS as err:
        raise db.translate(err) from err
    finally:
        pool.terminate()
    if applied:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
        print(f"task store schema at version {version} (applied {names})")
    else:
        print(f"task store schema is up to date (version {version})")
    broker_connection = await amqp.connect_broker(broker)
    async with broker_connection:
        channel = await broker_connection.channel()
        await amqp.declare_lifecycle_queue(channel, amqp.Topology(broker.prefix))
    print(f"lifecycle events are kept in {amqp.Topology(broker.prefix).lifecycle}")
    return 0


@traced("recorder")
async def cmd_recorder(args: argparse.Namespace) -> int:
    from sluicegate_recorder.app import Recorder
    from sluicegate_recorder.settings import RecorderSettings

    settings = load(RecorderSettings, retention=args.retention)
    recorder = Recorder(settings, _store(), _broker(args))
    check_metrics()
    stop = stop_on_signals()
    async with recorder, observed(recorder.metrics.registry, lambda: recorder.ready):
        await recorder.serve(stop)
    return 0


async def cmd_result(args: argparse.Namespace) -> int:
    check_task_id(args.task_id)
    timeout = number(args.timeout, "--timeout", float)
    if timeout is not None and not 0 < timeout < 1e9:
        raise InvalidInput("--timeout must be more than zero seconds")
    async with TaskStore(_store()) as store:
        if args.wait:
            try:
                record = await store.wait(args.task_id, timeout)
            except TimeoutError:
                print(f"sluicegate: task {args.task_id} did not finish within {timeout:g}s", file=sys.stderr)
                return 1
        else:
            found = await store.get(args.task_id)
            if found is None:
                print(f"sluicegate: the task store has no record of task {args.task_id}", file=sys.stderr)
                return 1
            record = found
    print(json.dumps(record.to_json(), indent=2) if args.json else show.render(record))
    return 0 if not args.wait or record.status == TaskState.COMPLETED else 1


async def cmd_tasks(args: argparse.Namespace) -> int:
    limit = int(number(args.limit, "--limit", int) or 0)
    if args.status is not None and args.status not in {s.value for s in TaskState}:
        raise InvalidInput(f"--status must be one of {', '.join(s.value for s in TaskState)}")
    since = None
    if args.since is not None:
        try:
            since = parse_long_duration(args.since)
        except ValueError as err:
            raise InvalidInput(f"--since: {err}") from err
    async with TaskStore(_store()) as store:
        records = await store.find(status=args.status, action=args.action, tenant=args.tenant, since=since, limit=limit)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
    elif records:
        print(show.table(records))
    else:
        print("no task records match", file=sys.stderr)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    from sluicegate.client import Client
    from sluicegate.v1 import messages_pb2

    check_task_id(args.task_id)
    if len(args.reason) > 500:
        raise InvalidInput("--reason must hold at most 500 characters")
    timeout = number(args.timeout, "--timeout", float)
    if timeout is not None and not 0 < timeout < 1e9:
        raise InvalidInput("--timeout must be more than zero seconds")
    store = load(StoreSettings)
    if args.wait and not store.configured:
        raise InvalidInput("--wait needs the task store: set SLUICEGATE_STORE_URL")
    async with Client(_broker(args), store=store) as client:
        result = await client.cancel(args.task_id, args.reason, timeout=timeout or 30.0, wait=args.wait)
        if not args.wait:
            print(f"cancellation of task {args.task_id} recorded")
            return 0
    if result is None:
        print(f"sluicegate: task {args.task_id} did not end within {timeout or 30.0:g}s", file=sys.stderr)
        return 1
    status = messages_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
    if result.status == messages_pb2.TASK_STATUS_CANCELLED:
        print(f"task {args.task_id} cancelled: {result.error}")
        return 0
    print(f"sluicegate: task {args.task_id} had already ended: {status}", file=sys.stderr)
    return 1


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    p = add_parser(commands, "migrate", "bring the task store's schema up to date and declare the recorder's queue")
    p.set_defaults(run=cmd_migrate)

    p = add_parser(commands, "recorder", "record lifecycle events into the task store (SLUICEGATE_STORE_URL)")
    p.add_argument("--retention", help="keep records unchanged for this long, e.g. 7d (default 7d)")
    p.set_defaults(run=cmd_recorder)

    p = add_parser(commands, "result", "show a task's record from the task store")
    p.add_argument("task_id", metavar="TASK_ID", help="the task's id")
    p.add_argument("--wait", action="store_true", help="wait until the task has finished; exit 1 unless completed")
    p.add_argument("--timeout", help="seconds to wait with --wait (default: no limit)")
    p.add_argument("--json", action="store_true", help="print the record as JSON (default: as text)")
    p.set_defaults(run=cmd_result)

    p = add_parser(commands, "tasks", "list task records, most recently changed first")
    p.add_argument("--status", help=f"only tasks in this state (default: any): {', '.join(s.value for s in TaskState)}")
    p.add_argument("--action", help="only tasks of this action (default: any)")
    p.add_argument("--tenant", help="only tasks of this tenant (default: any)")
    p.add_argument(
        "--since", help="only tasks whose record changed within this long, e.g. 30m, 1h, 7d (default: any time)"
    )
    p.add_argument("--limit", default="50", help=f"at most this many (1 to {MAX_LIMIT}; default 50)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON array (default: a table)")
    p.set_defaults(run=cmd_tasks)

    p = add_parser(
        commands,
        "cancel",
        "cancel a task wherever it is: waiting, delayed, queued or running (a running handler is stopped)",
    )
    p.add_argument("task_id", metavar="TASK_ID", help="the task's id")
    p.add_argument("--reason", default="cancelled by an operator", help="why, as the task's result will say")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until the task has ended (needs the task store); exit 1 unless it ended cancelled",
    )
    p.add_argument("--timeout", help="seconds to wait with --wait (default 30)")
    p.set_defaults(run=cmd_cancel)
