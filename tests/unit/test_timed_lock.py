"""Unit tests of TimedLock: the free path, FIFO hand-off, timeouts, cancellation and permits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate.errors import LockTimeout, RetryableError
from sluicegate_dispatcher.lock import TimedLock

pytestmark = pytest.mark.timeout(5)


async def spin(rounds: int = 5) -> None:
    """Let every ready callback and task run a few times (no wall-clock waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _spied_loop_calls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the delay of every `call_later` on the running loop; the real timer is still armed."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    real = loop.call_later

    def spy(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        calls.append(delay)
        return real(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", spy)
    return calls


def test_needs_at_least_one_permit() -> None:
    with pytest.raises(ValueError, match="permit"):
        TimedLock(0)
    with pytest.raises(ValueError, match="permit"):
        TimedLock(-3)


def test_lock_timeout_is_retryable() -> None:
    assert issubclass(LockTimeout, RetryableError)
    assert LockTimeout("x").retryable is True


@pytest.mark.asyncio
async def test_free_path_arms_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _spied_loop_calls(monkeypatch)
    lock = TimedLock()
    assert not lock.locked()
    await lock.acquire(1.0)
    assert lock.locked()
    assert calls == []
    lock.release()
    assert not lock.locked()
    await lock.acquire(1.0)
    assert calls == []


@pytest.mark.asyncio
async def test_contended_path_arms_a_timer_of_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Proves the spy above actually sees the lock's timers.
    calls = await _spied_loop_calls(monkeypatch)
    lock = TimedLock()
    await lock.acquire(1.0)
    waiter = asyncio.create_task(lock.acquire(0.75))
    await spin()
    assert calls == [0.75]
    lock.release()
    await waiter
    assert lock.locked()


@pytest.mark.asyncio
async def test_waiters_are_served_first_come_first_served() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    order: list[int] = []
    go = [asyncio.Event() for _ in range(6)]

    async def waiter(i: int) -> None:
        await lock.acquire(2.0)
        order.append(i)
        await go[i].wait()
        lock.release()

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(waiter(i)))
        await spin(2)  # each one enqueues before the next starts
    assert lock.waiting == 6
    assert order == []

    lock.release()
    for i in range(6):
        await spin()
        assert order == list(range(i + 1)), "exactly the oldest waiter holds the lock"
        assert lock.locked()
        go[i].set()
    await asyncio.gather(*tasks)
    assert not lock.locked()
    assert lock.waiting == 0


@pytest.mark.asyncio
async def test_release_hands_over_so_a_newcomer_cannot_overtake() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    first = asyncio.create_task(lock.acquire(1.0))
    await spin()
    lock.release()
    # The permit went straight to the waiter: it is not free for a newcomer, not even for an instant.
    assert lock.locked()
    with pytest.raises(LockTimeout):
        await lock.acquire(0)
    await first
    assert lock.locked()
    lock.release()
    assert not lock.locked()


@pytest.mark.asyncio
async def test_timeout_raises_lock_timeout_after_about_the_timeout() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LockTimeout):
        await lock.acquire(0.03)
    # It waited (roughly) the timeout rather than failing at once.
    assert loop.time() - started >= 0.02
    assert lock.waiting == 0
    assert lock.locked()  # still held by its owner


@pytest.mark.asyncio
async def test_timed_out_waiter_never_receives_the_lock_later() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    with pytest.raises(LockTimeout):
        await lock.acquire(0.01)
    lock.release()
    # The permit was freed rather than handed to the dead waiter.
    assert not lock.locked()
    await asyncio.wait_for(lock.acquire(0), 0.5)
    assert lock.locked()


@pytest.mark.asyncio
async def test_a_later_waiter_gets_the_lock_once_an_earlier_one_timed_out() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    impatient = asyncio.create_task(lock.acquire(0.01))
    await spin()
    patient = asyncio.create_task(lock.acquire(2.0))
    await spin()
    with pytest.raises(LockTimeout):
        await impatient
    assert lock.waiting == 1
    lock.release()
    await asyncio.wait_for(patient, 1.0)
    assert lock.locked()
    assert lock.waiting == 0


@pytest.mark.asyncio
async def test_waiter_cancelled_while_waiting_does_not_take_the_lock() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    waiter = asyncio.create_task(lock.acquire(2.0))
    await spin()
    assert lock.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lock.waiting == 0
    lock.release()
    assert not lock.locked()
    await lock.acquire(0)
    assert lock.locked()


@pytest.mark.asyncio
async def test_cancelled_waiter_is_skipped_in_favour_of_the_next() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    gone = asyncio.create_task(lock.acquire(2.0))
    await spin()
    next_in_line = asyncio.create_task(lock.acquire(2.0))
    await spin()
    gone.cancel()
    await spin()
    lock.release()
    await asyncio.wait_for(next_in_line, 1.0)
    assert gone.cancelled()
    assert lock.locked()


@pytest.mark.asyncio
async def test_waiter_handed_the_lock_then_cancelled_passes_it_on() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    handed = asyncio.create_task(lock.acquire(2.0))
    await spin()
    after = asyncio.create_task(lock.acquire(2.0))
    await spin()
    lock.release()  # hands the permit to `handed`, which has not resumed yet
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    await asyncio.wait_for(after, 1.0)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


@pytest.mark.asyncio
async def test_waiter_handed_the_lock_then_cancelled_frees_it_when_nobody_waits() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    handed = asyncio.create_task(lock.acquire(2.0))
    await spin()
    lock.release()
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    # No permit leaked: the lock is free and can be taken again at once.
    assert not lock.locked()
    await lock.acquire(0)
    with pytest.raises(LockTimeout):
        await lock.acquire(0)


@pytest.mark.asyncio
async def test_wait_for_around_acquire_cancels_cleanly() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lock.acquire(5.0), 0.01)
    assert lock.waiting == 0
    lock.release()
    assert not lock.locked()


@pytest.mark.asyncio
async def test_several_permits(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _spied_loop_calls(monkeypatch)
    lock = TimedLock(3)
    for _ in range(3):
        await lock.acquire(1.0)
    assert calls == []  # three free acquisitions, no timer
    assert lock.locked()
    with pytest.raises(LockTimeout):
        await lock.acquire(0)

    order: list[str] = []

    async def waiter(name: str) -> None:
        await lock.acquire(2.0)
        order.append(name)

    a = asyncio.create_task(waiter("a"))
    await spin()
    b = asyncio.create_task(waiter("b"))
    await spin()
    lock.release()
    await spin()
    assert order == ["a"]
    lock.release()
    await asyncio.gather(a, b)
    assert order == ["a", "b"]
    assert lock.locked()
    for _ in range(3):
        lock.release()
    assert not lock.locked()
    for _ in range(3):
        await lock.acquire(0)
    assert lock.locked()


@pytest.mark.asyncio
async def test_two_permits_locked_only_when_both_taken() -> None:
    lock = TimedLock(2)
    await lock.acquire(0)
    assert not lock.locked()
    await lock.acquire(0)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", [0, 0.0, -1.0])
async def test_non_positive_timeout_on_a_busy_lock_raises_at_once(
    monkeypatch: pytest.MonkeyPatch, limit: float
) -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    calls = await _spied_loop_calls(monkeypatch)
    with pytest.raises(LockTimeout):
        await lock.acquire(limit)
    assert calls == []
    assert lock.waiting == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", [0, -1.0])
async def test_non_positive_timeout_on_a_free_lock_takes_it(limit: float) -> None:
    lock = TimedLock()
    await lock.acquire(limit)
    assert lock.locked()


@pytest.mark.asyncio
async def test_lock_stays_usable_after_many_timeouts() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    results = await asyncio.gather(*(lock.acquire(0.01) for _ in range(50)), return_exceptions=True)
    assert all(isinstance(r, LockTimeout) for r in results)
    assert lock.waiting == 0
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    for _ in range(20):
        await lock.acquire(0.01)
        assert lock.locked()
        lock.release()
        assert not lock.locked()


@pytest.mark.asyncio
async def test_live_waiter_behind_many_dead_ones_gets_the_lock() -> None:
    lock = TimedLock()
    await lock.acquire(1.0)
    doomed = [asyncio.create_task(lock.acquire(0.01)) for _ in range(20)]
    await spin()
    survivor = asyncio.create_task(lock.acquire(2.0))
    await spin()
    assert lock.waiting == 21
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, LockTimeout) for r in results)
    assert lock.waiting == 1
    lock.release()
    await asyncio.wait_for(survivor, 1.0)
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    assert lock.waiting == 0


@pytest.mark.asyncio
async def test_waiting_counts_only_live_waiters() -> None:
    lock = TimedLock()
    assert lock.waiting == 0
    await lock.acquire(1.0)
    a = asyncio.create_task(lock.acquire(2.0))
    b = asyncio.create_task(lock.acquire(2.0))
    await spin()
    assert lock.waiting == 2
    a.cancel()
    await spin()
    assert lock.waiting == 1
    lock.release()
    await b
    assert lock.waiting == 0
