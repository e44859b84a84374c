"""amqp.publish: how what aio-pika raises becomes Sluicegate's outcome, above all a confirm cancelled by a dropped connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate import amqp
from sluicegate.errors import PublishError


class _Exchange:
    """Stands in for an aio-pika exchange: its publish waits, then ends as told."""

    name = "t.events"

    def __init__(self, outcome: BaseException | None, gate: asyncio.Event | None = None) -> None:
        self.outcome, self.gate = outcome, gate
        self.waiting = asyncio.Event()

    async def publish(self, message: Any, routing_key: str, *, mandatory: bool, timeout: float) -> None:
        self.waiting.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.outcome is not None:
            raise self.outcome


async def _publish(exchange: _Exchange) -> None:
    await amqp.publish(exchange, "state.d1", b"x", timeout=1)  # type: ignore[arg-type]


async def test_a_confirm_cancelled_by_the_connection_is_a_publish_error() -> None:
    # What aiormq does to the confirm it awaits when it closes a connection whose heartbeats stopped.
    with pytest.raises(PublishError, match="connection was lost"):
        await _publish(_Exchange(asyncio.CancelledError()))


async def test_a_loop_publishing_survives_a_dropped_connection() -> None:
    """The dispatcher's worker-state loop: it logs a failed publish and carries on."""
    outcomes: list[BaseException | None] = [asyncio.CancelledError(), TimeoutError(), None]
    sent = []
    for outcome in outcomes:
        try:
            await _publish(_Exchange(outcome))
            sent.append("ok")
        except PublishError:
            sent.append("retry")
    assert sent == ["retry", "retry", "ok"]


async def test_cancelling_the_publisher_is_still_a_cancellation() -> None:
    gate = asyncio.Event()
    exchange = _Exchange(None, gate)
    task = asyncio.create_task(_publish(exchange))
    await exchange.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


@pytest.mark.parametrize("error", [TimeoutError(), ConnectionResetError(), RuntimeError("channel closed")])
async def test_a_lost_or_late_confirm_is_a_publish_error(error: BaseException) -> None:
    with pytest.raises(PublishError, match="not confirmed"):
        await _publish(_Exchange(error))
