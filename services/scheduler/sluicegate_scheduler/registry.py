"""The registry: a record of every lane and intake the scheduler created, to find them again after a restart.

AMQP cannot list queues, and a lane may hold tasks for an action nobody serves for days, so every
queue the scheduler creates is first written down here (a quorum queue of LaneRecord batches).
A scheduler that takes the lead reads every record, keeps those whose queue still exists, writes
them back as one compacted set and only then acks the old ones: a crash in between leaves
duplicates, never a gap.
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from google.protobuf.message import DecodeError

from sluicegate import amqp
from sluicegate.v1 import messages_pb2

log = logging.getLogger(__name__)
CHUNK = 1000


class Registry:
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, topology: amqp.Topology) -> None:
        self._channel = channel  # with publisher confirms
        self._queue = queue
        self._topology = topology

    async def add(self, record: messages_pb2.LaneRecord) -> None:
        """Write a record down (confirmed) before the queue it names may receive anything."""
        await self._write([record])

    async def _write(self, records: list[messages_pb2.LaneRecord]) -> None:
        for start in range(0, len(records), CHUNK):
            body = messages_pb2.LaneRecordBatch(records=records[start : start + CHUNK]).SerializeToString()
            await amqp.publish(self._channel.default_exchange, self._topology.registry, body)

    async def recover(self, connection: AbstractConnection) -> list[messages_pb2.LaneRecord]:
        """Every lane and intake that still exists, with the registry compacted to them."""
        messages: list[AbstractIncomingMessage] = []
        records: dict[str, messages_pb2.LaneRecord] = {}
        while (message := await self._queue.get(fail=False, timeout=10)) is not None:
            messages.append(message)
            try:
                for record in messages_pb2.LaneRecordBatch.FromString(message.body).records:
                    records[record.queue] = record
            except DecodeError:
                log.warning("ignoring a registry record that does not decode")
        alive = [r for r in records.values() if await amqp.queue_exists(connection, r.queue)]
        if messages:
            await self._write(alive)
            await messages[-1].ack(multiple=True)
        if len(alive) < len(records):
            log.info("registry: %d queues gone since they were recorded", len(records) - len(alive))
        return alive
