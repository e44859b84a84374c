"""A worker that stops reading, and a worker killed mid-task: their tasks complete elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import grpc
import pytest

from sluicegate.client import TaskSpec
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc

from .conftest import Stack, eventually

COMPLETED = messages_pb2.TASK_STATUS_COMPLETED


@pytest.mark.parametrize(
    ("window", "caught_by"),
    [
        # A window wide enough that the unread writes fill the HTTP/2 buffer: later sends block,
        # time out on the send lock, and the stream's unacknowledged assignments are requeued.
        (128, Reason.LOCK_TIMEOUT),
        # The default window keeps unread writes below the buffer: the receipt deadline catches it.
        (32, Reason.ACK_TIMEOUT),
    ],
)
async def test_a_worker_that_stops_reading_only_slows_itself(stack: Stack, window: int, caught_by: Reason) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(ack_timeout="1s", receipt_window=window)
    healthy = [await stack.start_worker(dispatcher, f"healthy-{i}", slots=8) for i in range(4)]
    # Many slots and large payloads: its unread assignments fill the HTTP/2 window, so later
    # writes to it block and the send lock times out (not just the receipt deadline).
    deaf = await stack.start_worker(dispatcher, "deaf", slots=128)
    await stack.wait_workers_known(5)
    client = await stack.client()
    # A fleet that has run something: its host is out of probation (a cold one starts one task at a
    # time until its first receipt, and the burst this test needs would come from a lane in steps).
    warm = await client.submit_many([TaskSpec("echo", b"warm") for _ in range(10)])
    await asyncio.gather(*(client.result(i, timeout=10) for i in warm))
    received_before = deaf.stats.received

    async def go_deaf() -> None:
        await eventually(lambda: deaf.stats.received >= received_before + 5, timeout=30, interval=0.001)
        deaf.stop_reading()

    staller = asyncio.create_task(go_deaf())
    total = 800
    started = time.monotonic()
    ids = await client.submit_many([TaskSpec("echo", bytes(64 * 1024)) for _ in range(total)])

    # Sample the healthy workers' progress: they must keep completing while tasks remain.
    samples: list[tuple[float, int]] = []
    while len(client.results) < total and time.monotonic() - started < 120:
        samples.append((time.monotonic(), sum(w.stats.completed for w in healthy)))
        await asyncio.sleep(0.05)
    await staller
    elapsed = time.monotonic() - started
    results = [await client.result(i, timeout=1) for i in ids]

    longest_pause = 0.0
    last_change_at, last_count = samples[0]
    for at, count in samples[1:]:
        if count != last_count:
            last_change_at, last_count = at, count
        longest_pause = max(longest_pause, at - last_change_at)
    print(
        f"\nstall: {total} tasks in {elapsed:.2f}s ({total / elapsed:.0f}/s); "
        f"longest pause of healthy completions {longest_pause * 1000:.0f} ms; "
        f"lock timeouts {dispatcher.stats.lock_timeouts}; requeued {dict(scheduler.stats.requeued)}; "
        f"deaf completed {deaf.stats.completed}"
    )
    assert all(r.status == COMPLETED for r in results)
    assert len({r.task_id for r in results}) == total
    assert client.duplicates == 0
    assert scheduler.stats.requeued[caught_by.value] > 0
    if caught_by == Reason.LOCK_TIMEOUT:
        assert dispatcher.stats.lock_timeouts > 0, "sends to the deaf worker timed out on its lock"
    # It runs only what it read before going deaf (a stream message may carry several assignments);
    # everything else completes elsewhere. (It may not read the verdicts on what it finished.)
    assert deaf.stats.completed <= sum(1 for r in results if r.worker_id == "deaf") <= deaf.stats.received
    assert deaf.stats.received < total // 10
    assert sum(1 for r in results if r.worker_id != "deaf" and r.history) > 0, "its requeued tasks ran elsewhere"
    # Healthy workers never wait on the deaf one's lock. What can still happen near the end of the
    # run is that the last tasks sit unread in the deaf worker's stream until the receipt deadline
    # (ack_timeout) requeues them: that, plus a margin, bounds any pause.
    assert longest_pause < 1.0 + 1.0, f"healthy workers paused for {longest_pause:.2f}s"


async def test_a_worker_killed_mid_task_has_its_tasks_completed_elsewhere(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    env = {**os.environ, "SLUICEGATE_LOG_LEVEL": "WARNING"}
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluicegate", "worker",
        "--dispatchers", f"127.0.0.1:{dispatcher.port}", "--worker-id", "doomed", "--slots", "4",
        env=env,
    )  # fmt: skip
    try:
        await stack.wait_workers_known(1)
        client = await stack.client()
        ids = await client.submit_many([TaskSpec("sleep", {"seconds": 1.5}) for _ in range(4)])

        def doomed_is_running_all() -> bool:
            return any(
                s.worker_id == "doomed" and len(s.leases) == 4 and all(lease.received for lease in s.leases.values())
                for s in dispatcher.sessions
            )

        await eventually(doomed_is_running_all, timeout=15)
        await stack.start_worker(dispatcher, "survivor", slots=4)
        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(client.result(i) for i in ids)), 30)
    finally:
        if doomed.returncode is None:
            doomed.kill()
        await doomed.wait()
    reassigned_after = time.monotonic() - killed_at
    print(f"\nkill: 4 tasks of 1.5 s finished on the survivor {reassigned_after:.2f}s after SIGKILL")
    assert all(r.status == COMPLETED and r.worker_id == "survivor" for r in results)
    assert all(r.history[-1].reason == Reason.WORKER_LOST.value for r in results)
    assert all(r.attempt == 2 for r in results)
    assert scheduler.stats.requeued[Reason.WORKER_LOST.value] == 4


async def _acknowledge_then_stop_reading(address: str, holds: int, stop: asyncio.Event, held: asyncio.Event) -> int:
    """A worker, speaking the protocol by hand, that reads and acknowledges `holds` assignments (and
    answers the dispatcher's probes of its reading meanwhile), then never reads again and only
    heartbeats: it holds what it acknowledged and its handlers never start. Returns the pings it answered."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.Register(
            worker_pb2.RegisterRequest(worker_id="deaf", actions=["echo"], slots=holds, answers_pings=True)
        )
        call = stub.Session()
        await call.write(worker_pb2.WorkerMessage(worker_id="deaf", session_id=reply.session_id))
        received, answered = 0, 0
        while received < holds or not answered:
            message = await call.read()
            assert message is not grpc.aio.EOF
            events = [
                worker_pb2.TaskEvent(task_id=a.task.task_id, attempt=a.attempt, kind=worker_pb2.TaskEvent.KIND_RECEIVED)
                for a in message.assignments
            ]
            received += len(events)
            answered += bool(message.ping)
            await call.write(worker_pb2.WorkerMessage(events=events, pong=message.ping))
        held.set()
        while not stop.is_set() and not call.done():  # alive, as far as heartbeats go
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await call.write(worker_pb2.WorkerMessage())
            await asyncio.sleep(0.3)
        call.cancel()
        return answered


async def test_a_worker_that_acknowledged_its_tasks_then_stopped_reading_is_lost_and_they_run_elsewhere(
    stack: Stack,
) -> None:
    """Heartbeats are written, not read: a worker whose reading stalled after it acknowledged every
    task it holds looked alive for ever, and those tasks never ran (they wait for answers it does
    not read). Unanswered probes of its reading now lose it within the heartbeat timeout."""
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(heartbeat_timeout="2s", heartbeat_interval="500ms")
    client = await stack.client()
    stop, held = asyncio.Event(), asyncio.Event()
    deaf = asyncio.create_task(_acknowledge_then_stop_reading(Stack.address(dispatcher), 4, stop, held))
    await eventually(lambda: sum(w.ready for w in scheduler.pool) >= 1, timeout=10)
    ids = await client.submit_many([TaskSpec("echo", f"{i}".encode()) for i in range(4)])
    await asyncio.wait_for(held.wait(), 10)
    stopped_reading = time.monotonic()
    await stack.start_worker(dispatcher, "healthy")

    try:
        results = [await client.result(i, timeout=20) for i in ids]
    finally:
        stop.set()
        answered = await deaf
    took = time.monotonic() - stopped_reading
    print(f"\nheld by a worker that stopped reading: all 4 completed elsewhere {took:.1f} s later")
    assert answered >= 1
    (healthy,) = list(dispatcher.sessions)
    assert healthy.answers_pings, "the SDK's workers say they answer probes"
    assert all(r.status == COMPLETED and r.worker_id == "healthy" for r in results)
    assert [r.output for r in results] == [f"{i}".encode() for i in range(4)]
    assert scheduler.stats.requeued[Reason.WORKER_LOST.value] == 4
    assert took < 2 + 3  # the heartbeat timeout, and room for a loaded machine


class _SlowLink:
    """A worker's stream whose writes take `delay` to go through, in front of a worker that reads them all."""

    def __init__(self, context: object, delay: float) -> None:
        self._context, self.delay, self.writes = context, delay, 0

    async def write(self, message: object) -> None:
        self.writes += 1
        await asyncio.sleep(self.delay)
        await self._context.write(message)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._context, name)


async def test_a_worker_that_reads_everything_behind_a_slow_link_keeps_its_stream_and_its_tasks(stack: Stack) -> None:
    """On a loaded machine a write can take longer than the send lock's timeout to go through while
    the worker reads everything it was sent (with 200 workers on 2 cores, writes took up to a second).
    The next send's lock timeout took such a worker for stalled: its stream ended and what it held
    was requeued, and on a fleet the reconnects and requeues fed on each other until healthy workers
    were lost and tasks went dead. A lock timeout now ends a stream only when something written to
    it waits for its receipt; otherwise the send waits on, and the receipt deadline still bounds it."""
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher(ack_timeout="5s")
    worker = await stack.start_worker(dispatcher, "slow-link", slots=4)
    await stack.wait_workers_known(1)
    client = await stack.client()
    warm = await client.submit_many([TaskSpec("echo", b"warm") for _ in range(4)])
    await asyncio.gather(*(client.result(i, timeout=10) for i in warm))
    (session,) = list(dispatcher.sessions)
    link = _SlowLink(session.stream._context, delay=0.6)
    session.stream._context = link
    reconnects = worker.stats.reconnects

    ids = await client.submit_many([TaskSpec("echo", f"{i}".encode()) for i in range(12)])
    results = [await client.result(i, timeout=60) for i in ids]
    print(
        f"\nslow link: {link.writes} writes of 0.6 s; lock timeouts {dispatcher.stats.lock_timeouts}, "
        f"waits extended {dispatcher.stats.lock_waits_extended}; requeued {dict(scheduler.stats.requeued)}"
    )
    assert [r.output for r in results] == [f"{i}".encode() for i in range(12)]
    assert all(r.status == COMPLETED and r.worker_id == "slow-link" and not r.history for r in results)
    assert link.writes >= 6
    assert dispatcher.stats.lock_waits_extended > 0, "sends waited past the lock timeout"
    assert dispatcher.stats.lock_timeouts == 0
    assert sum(scheduler.stats.requeued.values()) == 0
    assert worker.stats.reconnects == reconnects
    assert list(dispatcher.sessions) == [session]
    assert session.stream is not None
