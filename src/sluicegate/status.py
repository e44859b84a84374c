"""What `sluicegate status` shows, gathered from what the services publish anyway and from the broker.

Dispatchers and their workers come from the dispatchers' state messages (a full snapshot at least
every second, deltas in between), heard on a queue of our own for a moment. Queues are looked up
by passive declaration (depth, consumers); the age of the oldest waiting message is read from the
head of each queue that has any, which is taken and put back at once (`peek`). No management API.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError

from sluicegate import amqp
from sluicegate.v1 import messages_pb2


@dataclass(slots=True)
class DispatcherView:
    """One dispatcher's latest full snapshot with the deltas that followed it applied."""

    dispatcher_id: str
    seq: int
    at_ms: int
    draining: bool
    workers: dict[str, messages_pb2.WorkerState] = field(default_factory=dict)  # by session id

    @property
    def in_flight(self) -> int:
        return sum(w.leases for w in self.workers.values())


def apply(views: dict[str, DispatcherView], state: messages_pb2.DispatcherState) -> None:
    """Fold one state message into the views (pure): a delta counts only right after what it follows."""
    known = views.get(state.dispatcher_id)
    if not state.delta:
        if known is None or state.seq > known.seq:
            views[state.dispatcher_id] = DispatcherView(
                state.dispatcher_id,
                state.seq,
                state.at_ms,
                state.draining,
                {w.session_id: w for w in state.workers},
            )
        return
    if known is None or state.seq != known.seq + 1:
        return  # a delta without the snapshot before it; the next full snapshot sets things right
    known.seq, known.at_ms, known.draining = state.seq, state.at_ms, state.draining
    for worker in state.workers:
        known.workers[worker.session_id] = worker
    for gone in state.gone:
        known.workers.pop(gone, None)


async def hear_dispatchers(
    connection: AbstractRobustConnection, topology: amqp.Topology, listen: float
) -> dict[str, DispatcherView]:
    """The dispatchers heard from within `listen` seconds."""
    views: dict[str, DispatcherView] = {}
    channel = await connection.channel()
    try:
        events = await channel.get_exchange(topology.events)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(events, routing_key="state.#")

        async def on_state(message: AbstractIncomingMessage) -> None:
            with contextlib.suppress(DecodeError):
                apply(views, messages_pb2.DispatcherState.FromString(message.body))

        await queue.consume(on_state, no_ack=True)
        await asyncio.sleep(listen)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return views


@dataclass(frozen=True, slots=True)
class QueueView:
    name: str
    kind: str  # intake, lane, tasks, requeue, due, delay, dead, lifecycle, inbox
    depth: int
    consumers: int
    oldest_ms: int | None  # when the oldest ready message started waiting (unix ms), if known


def queue_names(
    topology: amqp.Topology, recorded: list[str], dispatcher_ids: list[str], partitions: int = 1
) -> list[tuple[str, str]]:
    """Every queue worth showing, with its kind, in a stable order (each scheduler partition's own, then the shared)."""
    t = topology
    parts = [t.of_partition(k) for k in range(partitions)]
    names = [(name, kind) for p in parts for name, kind in ((p.tasks, "tasks"), (p.requeue, "requeue"), (p.due, "due"))]
    names += [(t.dead, "dead"), (t.lifecycle, "lifecycle")]
    intakes = tuple(f"{p.own}.intake." for p in parts)
    for name in recorded:
        names.append((name, "intake" if name.startswith(intakes) else "lane"))
    names += [(p.delay(ms), "delay") for p in parts for ms in amqp.DELAY_RUNGS_MS]
    names += [(t.inbox(d), "inbox") for d in dispatcher_ids]
    return names


def waiting_since(kind: str, body: bytes) -> int | None:
    """When the oldest item of a message started waiting (unix ms), from the body its queue holds."""
    try:
        if kind in ("tasks", "intake"):
            return min((t.submitted_at_ms for t in messages_pb2.TaskBatch.FromString(body).tasks), default=None)
        if kind in ("lane", "due", "delay"):
            items = messages_pb2.ParkedBatch.FromString(body).items
            return min((i.parked_at_ms or i.task.submitted_at_ms for i in items), default=None)
        if kind == "requeue":
            batch = messages_pb2.AssignmentBatch.FromString(body).assignments
            return min(((a.history[-1].at_ms if a.history else a.assigned_at_ms) for a in batch), default=None)
        if kind == "inbox":
            return min(
                (a.assigned_at_ms for a in messages_pb2.AssignmentBatch.FromString(body).assignments), default=None
            )
        if kind == "dead":
            return min((d.at_ms for d in messages_pb2.DeadLetterBatch.FromString(body).dead), default=None)
        if kind == "lifecycle":
            return min((e.at_ms for e in messages_pb2.LifecycleBatch.FromString(body).events), default=None)
    except DecodeError:
        return None
    return None


async def look_up_queues(
    connection: AbstractRobustConnection, names: list[tuple[str, str]], *, peek: bool
) -> list[QueueView]:
    """Depth and consumers of each queue that exists (passive declaration), and the age of its head."""
    views: list[QueueView] = []
    channel: Any = await connection.channel()
    try:
        for name, kind in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()  # a failed passive declare closes the channel
                continue
            declared = queue.declaration_result
            depth, consumers = declared.message_count or 0, declared.consumer_count or 0
            oldest = None
            if peek and depth:
                try:
                    oldest = await _peek(queue, kind)
                except aiormq.exceptions.AMQPError:
                    # Quorum queues with a single active consumer (tasks, requeue, intakes, lanes)
                    # refuse basic.get, and the refusal closes the channel.
                    channel = await connection.channel()
            views.append(QueueView(name, kind, depth, consumers, oldest))
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return views


async def _peek(queue: aio_pika.abc.AbstractQueue, kind: str) -> int | None:
    """The head's waiting time, read and put straight back (a consumer may have taken it meanwhile)."""
    message = await queue.get(fail=False, timeout=5)
    if message is None:
        return None
    try:
        return waiting_since(kind, message.body)
    finally:
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)
