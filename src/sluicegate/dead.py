"""The dead letters an operator looks at, replays or purges: read from `<prefix>.dead`, put back unless told otherwise.

Reading takes every message (basic.get, unacknowledged) and returns the ones it does not consume
with a nack that requeues them, so a listing changes nothing and a crash midway loses nothing: the
broker gives back whatever a closed channel still held. A replay resubmits each chosen task as a
new task (a new id, a fresh attempt budget, its deadlines counted from now), confirmed, before its
dead letter is removed; the dead letters sharing its message are published back first.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError

from sluicegate import amqp, lifecycle
from sluicegate.errors import InvalidInput
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms

MAX_READ = 10_000  # dead letters read at once (each held unacknowledged while a command runs)
K = messages_pb2.LifecycleEvent


@dataclass(slots=True)
class Held:
    """One message of the dead queue, held unacknowledged, and its dead letters."""

    message: AbstractIncomingMessage
    letters: list[messages_pb2.DeadLetter]
    undecodable: bool = False


@dataclass(slots=True)
class DeadQueue:
    """The dead letters read from the queue, until `release` puts back what is still held."""

    topology: amqp.Topology
    connection: AbstractRobustConnection
    held: list[Held] = field(default_factory=list)
    channel: Any = None

    @property
    def letters(self) -> list[messages_pb2.DeadLetter]:
        return [letter for h in self.held for letter in h.letters]

    @property
    def undecodable(self) -> int:
        return sum(h.undecodable for h in self.held)

    async def read(self, limit: int = MAX_READ) -> DeadQueue:
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            queue = await self.channel.declare_queue(self.topology.dead, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as err:
            raise InvalidInput(f"there is no dead-letter queue {self.topology.dead}: is the prefix right?") from err
        while len(self.held) < limit and (message := await queue.get(fail=False, timeout=10)) is not None:
            try:
                batch = messages_pb2.DeadLetterBatch.FromString(message.body)
                self.held.append(Held(message, list(batch.dead)))
            except DecodeError:
                self.held.append(Held(message, [], undecodable=True))
        return self

    def find(self, task_ids: Iterable[str]) -> dict[str, messages_pb2.DeadLetter]:
        wanted = set(task_ids)
        return {letter.task.task_id: letter for letter in self.letters if letter.task.task_id in wanted}

    async def remove(self, task_ids: set[str]) -> None:
        """Remove these dead letters: what shares a message with them is published back, then it is acked."""
        dead = await self.channel.get_exchange(self.topology.dead)
        for held in list(self.held):
            if not any(letter.task.task_id in task_ids for letter in held.letters):
                continue
            rest = [letter for letter in held.letters if letter.task.task_id not in task_ids]
            if rest:
                body = messages_pb2.DeadLetterBatch(dead=rest).SerializeToString()
                await amqp.publish(dead, "", body, headers=held.message.headers or None)
            await held.message.ack()
            self.held.remove(held)

    async def purge(self) -> int:
        """Acknowledge (delete) every dead letter read; returns how many there were."""
        count = len(self.letters) + self.undecodable
        for held in self.held:
            await held.message.ack()
        self.held.clear()
        return count

    async def release(self) -> None:
        """Put back every message still held, in its order; never raises."""
        for held in self.held:
            with contextlib.suppress(Exception):
                await held.message.nack(requeue=True)
        self.held.clear()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()


def last_reason(letter: messages_pb2.DeadLetter) -> messages_pb2.Requeue | None:
    return letter.reasons[-1] if letter.reasons else None


def attempts(letter: messages_pb2.DeadLetter) -> int:
    return max((r.attempt for r in letter.reasons), default=0)


def replay_task(letter: messages_pb2.DeadLetter, reply_to: str, now: int | None = None) -> messages_pb2.Task:
    """The task to submit again: a new id, counted from now, with nothing of its earlier attempts."""
    task = messages_pb2.Task()
    task.CopyFrom(letter.task)
    task.task_id = uuid.uuid4().hex
    task.reply_to = reply_to
    task.submitted_at_ms = now_ms() if now is None else now
    task.run_at_ms = 0  # a delay was served already
    task.trace.clear()  # a trace of its own
    return task


def replay_events(old: messages_pb2.DeadLetter, new: messages_pb2.Task, at: int) -> list[messages_pb2.LifecycleEvent]:
    """What the task records keep of a replay: on the dead task, and on the one replaying it."""
    return [
        lifecycle.task_event(
            K.KIND_REPLAYED,
            old.task,
            attempt=attempts(old),
            reason="replayed",
            detail=f"replayed as {new.task_id}",
            at_ms=at,
        ),
        lifecycle.task_event(K.KIND_REPLAYED, new, reason="replay", detail=f"replay of {old.task.task_id}", at_ms=at),
    ]
