"""Unit tests of WorkerStream.send: the lock is held for the whole write, failures become StreamBroken."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate.errors import LockTimeout, RetryableError, StreamBroken
from sluicegate_dispatcher.stream import WorkerStream

pytestmark = pytest.mark.timeout(5)


async def spin(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeContext:
    """Stands in for a gRPC servicer context: `write` records the message, optionally blocking or failing."""

    def __init__(self, *, block: bool = False, fail: BaseException | None = None) -> None:
        self.written: list[Any] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.active = 0
        self.max_active = 0
        if not block:
            self.release.set()
        self.fail = fail

    async def write(self, message: Any) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            await self.release.wait()
            if self.fail is not None:
                raise self.fail
            self.written.append(message)
        finally:
            self.active -= 1


def test_stream_broken_is_retryable() -> None:
    assert issubclass(StreamBroken, RetryableError)


@pytest.mark.asyncio
async def test_send_writes_and_frees_the_lock() -> None:
    ctx = FakeContext()
    stream = WorkerStream(ctx)
    waited = await stream.send("m1", 0.1)
    assert ctx.written == ["m1"]
    assert isinstance(waited, float)
    assert waited >= 0
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_lock_is_held_until_the_write_finished() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    first = asyncio.create_task(stream.send("m1", 0.1))
    await asyncio.wait_for(ctx.started.wait(), 1.0)
    assert stream.lock.locked()
    assert not first.done()

    with pytest.raises(LockTimeout):
        await stream.send("m2", 0.02)
    assert stream.lock.locked(), "the write is still in progress"
    assert ctx.written == []

    ctx.release.set()
    await asyncio.wait_for(first, 1.0)
    assert ctx.written == ["m1"]
    assert not stream.lock.locked()
    await stream.send("m3", 0.02)
    assert ctx.written == ["m1", "m3"]


@pytest.mark.asyncio
async def test_sends_queue_behind_a_write_in_arrival_order_one_at_a_time() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(stream.send(i, 2.0)))
        await spin(2)
    assert stream.lock.waiting == 4
    ctx.release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    assert ctx.written == [0, 1, 2, 3, 4]
    assert ctx.max_active == 1


@pytest.mark.asyncio
async def test_two_permits_allow_two_concurrent_writes() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx, permits=2)
    a = asyncio.create_task(stream.send("a", 0.1))
    b = asyncio.create_task(stream.send("b", 0.1))
    await spin()
    assert ctx.active == 2
    with pytest.raises(LockTimeout):
        await stream.send("c", 0.01)
    ctx.release.set()
    await asyncio.gather(a, b)
    assert sorted(ctx.written) == ["a", "b"]
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_failing_write_becomes_stream_broken_and_frees_the_lock() -> None:
    boom = RuntimeError("h2 reset")
    ctx = FakeContext(fail=boom)
    stream = WorkerStream(ctx)
    with pytest.raises(StreamBroken) as info:
        await stream.send("m", 0.1)
    assert info.value.__cause__ is boom
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_cancelled_write_propagates_cancellation_and_frees_the_lock() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    task = asyncio.create_task(stream.send("m", 0.1))
    await asyncio.wait_for(ctx.started.wait(), 1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_sending_on_an_ended_stream_raises_stream_broken_without_writing() -> None:
    ctx = FakeContext()
    stream = WorkerStream(ctx)
    stream.end("replaced by a newer stream")
    with pytest.raises(StreamBroken, match="replaced by a newer stream"):
        await stream.send("m", 0.1)
    assert ctx.written == []
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_ended_without_reason_still_raises_stream_broken() -> None:
    stream = WorkerStream(FakeContext())
    stream.end("")
    with pytest.raises(StreamBroken):
        await stream.send("m", 0.1)


@pytest.mark.asyncio
async def test_queued_send_fails_once_the_stream_ends_while_it_waits() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    first = asyncio.create_task(stream.send("m1", 1.0))
    await asyncio.wait_for(ctx.started.wait(), 1.0)
    second = asyncio.create_task(stream.send("m2", 1.0))
    await spin()
    stream.end("send timed out; reconnect")
    ctx.release.set()
    await first
    with pytest.raises(StreamBroken, match="send timed out"):
        await second
    assert ctx.written == ["m1"]
    assert not stream.lock.locked()


@pytest.mark.asyncio
async def test_send_returns_the_time_it_waited_for_the_lock() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    first = asyncio.create_task(stream.send("m1", 1.0))
    await asyncio.wait_for(ctx.started.wait(), 1.0)
    second = asyncio.create_task(stream.send("m2", 1.0))
    await asyncio.sleep(0.05)
    ctx.release.set()
    first_waited = await first
    second_waited = await second
    assert first_waited >= 0
    assert second_waited >= 0.03  # it queued behind a write that took ~50 ms
    assert second_waited > first_waited


@pytest.mark.asyncio
async def test_waited_does_not_include_the_write_itself() -> None:
    ctx = FakeContext(block=True)
    stream = WorkerStream(ctx)
    task = asyncio.create_task(stream.send("m1", 1.0))
    await asyncio.wait_for(ctx.started.wait(), 1.0)
    await asyncio.sleep(0.05)
    ctx.release.set()
    waited = await task
    assert 0 <= waited < 0.03


def test_end_keeps_the_first_reason() -> None:
    stream = WorkerStream(object())
    assert not stream.ended.is_set()
    assert stream.reason == ""
    stream.end("first")
    stream.end("second")
    assert stream.ended.is_set()
    assert stream.reason == "first"
