"""The scheduler's own queues: intakes per tenant, lanes, the delay ladder, the registry and the lead."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from sluicegate import amqp

# Every queue only the scheduler reads is single-active-consumer: with a standby connected, one
# scheduler at a time reads it even if two ever believed they lead.
SAC = {"x-single-active-consumer": True}


def scheduled(**extra: Any) -> dict[str, Any]:
    return amqp.quorum(**SAC, **extra)


async def declare_intake(channel: AbstractChannel, topology: amqp.Topology, tenant: str) -> AbstractQueue:
    """A tenant's own intake, bound to `tasks` by the tenant's name: its submissions stop queueing behind others'."""
    queue = await channel.declare_queue(topology.intake(tenant), durable=True, arguments=scheduled())
    await queue.bind(topology.tasks, routing_key=tenant)
    return queue


async def declare_lane(channel: AbstractChannel, name: str) -> AbstractQueue:
    return await channel.declare_queue(name, durable=True, arguments=scheduled())


async def declare_rung(channel: AbstractChannel, topology: amqp.Topology, millis: int) -> AbstractQueue:
    """One rung of the delay ladder: what waited `millis` dead-letters (at least once) to `due`."""
    return await channel.declare_queue(
        topology.delay(millis),
        durable=True,
        arguments=amqp.quorum(
            **{
                "x-message-ttl": millis,
                "x-dead-letter-exchange": topology.due,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        ),
    )


async def declare_own(channel: AbstractChannel, topology: amqp.Topology) -> tuple[AbstractExchange, dict[str, Any]]:
    """The fixed queues: `due` (bound to its exchange), the registry and the lead; returns the due exchange."""
    due = await channel.declare_exchange(topology.due, aio_pika.ExchangeType.FANOUT, durable=True)
    queues = {
        "due": await amqp.declare_bound_queue(channel, due, topology.due, scheduled()),
        "registry": await channel.declare_queue(topology.registry, durable=True, arguments=amqp.quorum()),
        "leader": await channel.declare_queue(topology.leader, durable=True, arguments=scheduled()),
    }
    return due, queues
