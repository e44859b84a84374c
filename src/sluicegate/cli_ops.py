"""`sluicegate status` and `sluicegate cleanup`: what runs under a prefix, and removing all of it."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq

from sluicegate import amqp, status
from sluicegate.cli_base import add_parser, number
from sluicegate.cli_base import broker as _broker
from sluicegate.errors import InvalidInput
from sluicegate.settings import load
from sluicegate.wire import now_ms

STORE_WINDOW = timedelta(hours=1)


def _ago(ms: int | None, now: int) -> str:
    if not ms:
        return "-"
    seconds = max(0.0, (now - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _exists(connection: Any, exchange: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_exchange(exchange, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def gather(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `status` shows, as plain data (what --json prints)."""
    broker = _broker(args)
    topology = amqp.Topology(broker.prefix)
    listen = number(args.listen, "--listen", float) or 2.5
    if not 0 < listen <= 60:
        raise InvalidInput("--listen must be more than 0 and at most 60 seconds")
    connection = await amqp.connect_broker(broker)
    async with connection:
        if not await _exists(connection, topology.events):
            raise InvalidInput(f"nothing runs under prefix {broker.prefix!r} (there is no exchange {topology.events})")
        views = await status.hear_dispatchers(connection, topology, listen)
        lanes = {
            r.queue: r
            for k in range(broker.partitions)
            for r in await amqp.recorded_lanes(connection, topology.of_partition(k))
        }
        names = status.queue_names(topology, sorted(lanes), sorted(views), broker.partitions)
        queues = await status.look_up_queues(connection, names, peek=not args.no_peek)
    counts, waiting = await _from_store()
    now = now_ms()

    def oldest_wait(q: status.QueueView) -> str:
        if q.oldest_ms:
            return _ago(q.oldest_ms, now)
        lane = lanes.get(q.name)
        since = waiting.get((lane.tenant, lane.action)) if lane is not None and q.depth else None
        # A lane's head cannot be read while the scheduler may consume it: the store says how long
        # the longest-waiting task of its tenant and action has been waiting.
        return f"{_ago(int(since.timestamp() * 1000), now)} (store)" if since is not None else "-"

    found: dict[str, Any] = {
        "prefix": broker.prefix,
        "dispatchers": [
            {
                "id": v.dispatcher_id,
                "draining": v.draining,
                "heard": _ago(v.at_ms, now),
                "workers": len(v.workers),
                "slots_free": sum(max(0, w.free_slots - w.prefetch) for w in v.workers.values()),
                "slots_total": sum(w.slots for w in v.workers.values()),
                "in_flight": v.in_flight,
            }
            for v in sorted(views.values(), key=lambda v: v.dispatcher_id)
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "dispatcher": v.dispatcher_id,
                "tenant": w.tenant,
                "ready": w.ready,
                "slots_free": max(0, w.free_slots - w.prefetch),
                "slots_total": w.slots,
                "in_flight": w.leases,
                "last_heartbeat": _ago(w.last_seen_ms, now),
                "actions": list(w.actions),
            }
            for v in views.values()
            for w in sorted(v.workers.values(), key=lambda w: w.worker_id)
        ],
        "queues": [
            {
                "name": q.name,
                "kind": q.kind,
                "depth": q.depth,
                "consumers": q.consumers,
                "oldest_wait": oldest_wait(q),
            }
            for q in queues
            if q.kind not in ("delay", "inbox") or q.depth  # empty rungs and inboxes are noise
        ],
        "in_flight": sum(v.in_flight for v in views.values()),
    }
    found["tasks"] = counts
    return found


async def _from_store() -> tuple[list[dict[str, Any]] | None, dict[tuple[str, str], datetime]]:
    """Task counts by status, and since when each (tenant, action) has a task waiting: from the store, if any."""
    from sluicegate.store import StoreSettings, TaskStore

    settings = load(StoreSettings)
    if not settings.configured:
        return None, {}
    async with TaskStore(settings) as store:
        counts = await store.status_counts(STORE_WINDOW)
        waiting = await store.oldest_waiting()
    now = datetime.now(UTC)
    listed = [
        {"status": s, "tasks": n, "oldest": f"{(now - oldest).total_seconds():.0f}s ago" if oldest else "-"}
        for s, n, oldest in counts
    ]
    return listed, waiting


def render(found: dict[str, Any]) -> str:
    lines = [f"prefix {found['prefix']}", f"dispatchers ({len(found['dispatchers'])})"]
    if found["dispatchers"]:
        rows: list[tuple[str, ...]] = [("DISPATCHER", "STATE", "WORKERS", "FREE/TOTAL SLOTS", "IN FLIGHT", "HEARD")]
        for d in found["dispatchers"]:
            state = "draining" if d["draining"] else "serving"
            slots = f"{d['slots_free']}/{d['slots_total']}"
            rows.append((d["id"], state, str(d["workers"]), slots, str(d["in_flight"]), f"{d['heard']} ago"))
        lines.append(_table(rows))
    lines.append(f"workers ({len(found['workers'])})")
    if found["workers"]:
        rows = [("WORKER", "DISPATCHER", "TENANT", "FREE/TOTAL SLOTS", "IN FLIGHT", "LAST HEARTBEAT", "ACTIONS")]
        for w in found["workers"]:
            rows.append(
                (
                    w["worker_id"] + ("" if w["ready"] else " (not ready)"),
                    w["dispatcher"],
                    w["tenant"],
                    f"{w['slots_free']}/{w['slots_total']}",
                    str(w["in_flight"]),
                    f"{w['last_heartbeat']} ago",
                    ",".join(w["actions"]),
                )
            )
        lines.append(_table(rows))
    lines.append("queues")
    rows = [("QUEUE", "KIND", "DEPTH", "CONSUMERS", "OLDEST WAIT")]
    for q in found["queues"]:
        rows.append((q["name"], q["kind"], str(q["depth"]), str(q["consumers"]), q["oldest_wait"]))
    lines.append(_table(rows))
    lines.append(f"in flight {found['in_flight']} (assignments held by workers)")
    if found["tasks"] is not None:
        lines.append(f"task records changed in the last {STORE_WINDOW.total_seconds() / 3600:.0f}h")
        rows = [("STATUS", "TASKS", "OLDEST SUBMITTED")] + [
            (t["status"], str(t["tasks"]), t["oldest"]) for t in found["tasks"]
        ]
        lines.append(_table(rows) if found["tasks"] else "  none")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    found = await gather(args)
    print(json.dumps(found, indent=2) if args.json else render(found))
    return 0


async def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.prefix is None:
        raise InvalidInput("cleanup needs --prefix: it deletes every queue and exchange under it")
    broker = _broker(args)
    topology = amqp.Topology(broker.prefix)
    connection = await amqp.connect_broker(broker)
    async with connection:
        views = (
            await status.hear_dispatchers(connection, topology, 1.5)
            if await _exists(connection, topology.events)
            else {}
        )
        dispatchers = sorted(set(views) | set(args.dispatcher or []))
        recorded = [
            name
            for k in range(broker.partitions)
            for name in await amqp.recorded_queues(connection, topology.of_partition(k))
        ]
        names = status.queue_names(topology, recorded, dispatchers, broker.partitions)
        queues = await status.look_up_queues(connection, names, peek=False)
        busy = [q.name for q in queues if q.consumers]
        if (busy or views) and not args.force:
            running = f"{len(views)} dispatcher(s) running" if views else f"{len(busy)} queue(s) with consumers"
            raise InvalidInput(
                f"something still runs under {broker.prefix!r} ({running}): stop it first, or add --force"
            )
        await amqp.delete_topology(connection, topology, dispatchers, partitions=broker.partitions)
    print(
        f"deleted every queue and exchange under {broker.prefix!r} that was found ({len(queues)} queue(s) existed;"
        f" lanes and intakes from the registry, inboxes of {len(dispatchers)} dispatcher(s))"
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    p = add_parser(commands, "status", "show dispatchers, workers, queues and what is in flight under the prefix")
    p.add_argument("--listen", help="seconds to listen for the dispatchers' state messages (default: 2.5)")
    p.add_argument(
        "--no-peek",
        action="store_true",
        help="leave out the oldest waits, which read each non-empty queue's head and put it back (default: peek)",
    )
    p.add_argument("--json", action="store_true", help="print it as JSON (default: as tables)")
    p.set_defaults(run=cmd_status)

    p = add_parser(commands, "cleanup", "delete every queue and exchange under a prefix (--prefix is required)")
    p.add_argument(
        "--dispatcher",
        action="append",
        metavar="ID",
        help="also the inbox of this dispatcher, which no longer runs; repeatable (default: those heard running)",
    )
    p.add_argument("--force", action="store_true", help="even while something still runs under the prefix")
    p.set_defaults(run=cmd_cleanup)
