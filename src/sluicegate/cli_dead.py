"""`sluicegate dead list | show ID | replay ID... | purge`: the tasks that ran out of attempts."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from sluicegate import amqp, dead
from sluicegate.cli_base import add_parser, number
from sluicegate.cli_base import broker as _broker
from sluicegate.errors import InvalidInput
from sluicegate.store.reader import check_task_id
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms > 0 else "-"


def _letter_json(letter: messages_pb2.DeadLetter, *, payload: bool = False) -> dict[str, Any]:
    task = letter.task
    found: dict[str, Any] = {
        "task_id": task.task_id,
        "tenant": task.tenant,
        "action": task.action,
        "attempts": dead.attempts(letter),
        "dead_at": _when(letter.at_ms),
        "reason": (dead.last_reason(letter) or messages_pb2.Requeue()).reason,
        "payload_bytes": len(task.payload),
        "reasons": [
            {
                "reason": r.reason,
                "detail": r.detail,
                "attempt": r.attempt,
                "worker_id": r.worker_id,
                "at": _when(r.at_ms),
            }
            for r in letter.reasons
        ],
    }
    if payload:
        found["payload"] = task.payload.decode(errors="replace")
    return found


def _table(letters: list[messages_pb2.DeadLetter]) -> str:
    rows = [("TASK", "ACTION", "TENANT", "ATTEMPTS", "REASON", "DEAD SINCE")]
    for letter in letters:
        last = dead.last_reason(letter)
        rows.append(
            (
                letter.task.task_id,
                letter.task.action,
                letter.task.tenant,
                str(dead.attempts(letter)),
                last.reason if last else "-",
                _when(letter.at_ms),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _open(args: argparse.Namespace) -> dead.DeadQueue:
    broker = _broker(args)
    connection = await amqp.connect_broker(broker)
    queue = dead.DeadQueue(amqp.Topology(broker.prefix), connection)
    try:
        return await queue.read(int(number(getattr(args, "limit", None), "--limit", int) or dead.MAX_READ))
    except BaseException:
        await _close(queue)
        raise


async def _close(queue: dead.DeadQueue) -> None:
    await queue.release()
    await queue.connection.close()


async def cmd_list(args: argparse.Namespace) -> int:
    limit = number(args.limit, "--limit", int)
    if limit is not None and not 1 <= limit <= dead.MAX_READ:
        raise InvalidInput(f"--limit must be between 1 and {dead.MAX_READ}")
    queue = await _open(args)
    try:
        letters, undecodable = queue.letters, queue.undecodable
    finally:
        await _close(queue)
    if args.json:
        print(json.dumps([_letter_json(letter) for letter in letters], indent=2))
    elif letters:
        print(_table(letters))
    else:
        print("no dead letters", file=sys.stderr)
    if undecodable:
        print(
            f"sluicegate: {undecodable} message(s) in the dead queue do not decode; left as they are", file=sys.stderr
        )
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    check_task_id(args.task_id)
    queue = await _open(args)
    try:
        letter = queue.find([args.task_id]).get(args.task_id)
    finally:
        await _close(queue)
    if letter is None:
        print(f"sluicegate: no dead letter for task {args.task_id}", file=sys.stderr)
        return 1
    found = _letter_json(letter, payload=True)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for key in ("task_id", "action", "tenant", "attempts", "dead_at", "reason", "payload_bytes", "payload"):
        print(f"{key.replace('_', ' '):<14} {found[key]}")
    print("reasons")
    for r in found["reasons"]:
        print(f"  {r['at']}  attempt {r['attempt']:<3} {r['reason']:<18} {r['worker_id'] or '-':<12} {r['detail']}")
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    from sluicegate.client import Client

    for task_id in args.task_ids:
        check_task_id(task_id)
    timeout = number(args.timeout, "--timeout", float)
    if timeout is not None and not 0 < timeout < 1e9:
        raise InvalidInput("--timeout must be more than zero seconds")
    broker = _broker(args)
    queue = await _open(args)
    try:
        found = queue.find(args.task_ids)
        missing = [t for t in args.task_ids if t not in found]
        if missing:
            raise InvalidInput(f"no dead letter for task {', '.join(missing)}: nothing was replayed")
        async with Client(broker) as client:
            at = now_ms()
            replays = {old: dead.replay_task(letter, client.client_id, at) for old, letter in found.items()}
            await client.resubmit(replays.values())
            await queue.remove(set(replays))
            events = [e for old, new in replays.items() for e in dead.replay_events(found[old], new, at)]
            await _record(queue, events, broker.confirm_timeout_s)
            for old, new in replays.items():
                print(f"{old} replayed as {new.task_id}")
            if not args.wait:
                return 0
            failed = 0
            for new in replays.values():
                result = await client.result(new.task_id, timeout=timeout or 120.0)
                status = messages_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
                print(f"{new.task_id} {status}{': ' + result.error if result.error else ''}")
                failed += result.status != messages_pb2.TASK_STATUS_COMPLETED
            return 1 if failed else 0
    finally:
        await _close(queue)


async def _record(queue: dead.DeadQueue, events: list[messages_pb2.LifecycleEvent], timeout: float) -> None:
    """Tell the recorder (if one keeps records): not mandatory, as every lifecycle event."""
    events_exchange = await queue.channel.get_exchange(queue.topology.events)
    body = messages_pb2.LifecycleBatch(events=events).SerializeToString()
    await amqp.publish(
        events_exchange, queue.topology.lifecycle_key("operator"), body, mandatory=False, timeout=timeout
    )


async def cmd_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise InvalidInput("purge deletes every dead letter for good: add --yes")
    queue = await _open(args)
    try:
        count = await queue.purge()
    finally:
        await _close(queue)
    print(f"purged {count} dead letter(s)")
    return 0


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    p = add_parser(commands, "dead", "list, show, replay or purge the tasks that ran out of attempts")
    sub = p.add_subparsers(dest="dead_command", required=True, metavar="ACTION")

    q = add_parser(sub, "list", "list the dead letters in queue order (they stay where they are)")
    q.add_argument("--limit", help=f"read at most this many (default: {dead.MAX_READ})")
    q.add_argument("--json", action="store_true", help="print them as a JSON array (default: a table)")
    q.set_defaults(run=cmd_list)

    q = add_parser(sub, "show", "show one dead letter: the task, its payload and every reason")
    q.add_argument("task_id", metavar="TASK_ID", help="the dead task's id")
    q.add_argument("--json", action="store_true", help="print it as JSON (default: as text)")
    q.set_defaults(run=cmd_show)

    q = add_parser(sub, "replay", "submit dead tasks again, as new tasks with a fresh attempt budget")
    q.add_argument("task_ids", nargs="+", metavar="TASK_ID", help="the dead tasks' ids")
    q.add_argument("--wait", action="store_true", help="wait for the replays' results; exit 1 unless all completed")
    q.add_argument("--timeout", help="seconds to wait for each result with --wait (default: 120)")
    q.set_defaults(run=cmd_replay)

    q = add_parser(sub, "purge", "delete every dead letter")
    q.add_argument("--yes", action="store_true", help="really delete them (default: refuse)")
    q.set_defaults(run=cmd_purge)
