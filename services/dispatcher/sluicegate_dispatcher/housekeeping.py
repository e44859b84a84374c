"""The dispatcher's housekeeping loops: losing silent workers, catching unacknowledged receipts and
attempts out of time, telling the scheduler about its workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from aio_pika.abc import AbstractExchange

from sluicegate import amqp
from sluicegate.errors import PublishError, Unroutable
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate.wire import now_ms
from sluicegate_dispatcher.sessions import Sessions, WorkerSession, not_reading
from sluicegate_dispatcher.settlement import Settler
from sluicegate_dispatcher.stats import DispatcherStats

log = logging.getLogger(__name__)


class Reaper:
    """Requeues the leases of lost workers and of assignments never acknowledged."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        settler: Settler,
        stats: DispatcherStats,
        heartbeat_timeout: float,
        reconnect_grace: float,
        clock: Callable[[], float],
        sweep: Callable[[], None] = lambda: None,
        every: float = 0.05,
    ) -> None:
        self.sessions, self.settler, self.stats = sessions, settler, stats
        self._sweep = sweep  # cancellations past their grace, attempts past their run deadline
        self.heartbeat_timeout, self.reconnect_grace = heartbeat_timeout, reconnect_grace
        self.clock, self.every = clock, every
        self.ping_every = heartbeat_timeout / 3  # a probe of a worker's reading, while it holds tasks
        self._probed_at = float("-inf")  # the last pass over the sessions for probes due

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.sweep()

    async def sweep(self) -> None:
        self._sweep()
        now = self.clock()
        for session in self.sessions.lost(
            now, heartbeat_timeout=self.heartbeat_timeout, reconnect_grace=self.reconnect_grace
        ):
            if session.leaving:  # a clean shutdown: nothing went wrong
                log.info("worker %s left (shut down); requeueing %d leases", session.worker_id, len(session.leases))
                await self.settler.lose(session, Reason.WORKER_LOST, "worker shut down")
                continue
            if not_reading(session, now, self.heartbeat_timeout):
                why = "worker does not read its stream"
                if session.stream is not None:
                    session.stream.end(f"{why}; reconnect")
            else:
                why = "worker stopped heartbeating or streaming"
            log.warning("worker %s lost (%s); requeueing %d leases", session.worker_id, why, len(session.leases))
            await self.settler.lose(session, Reason.WORKER_LOST, why)
        if now - self._probed_at >= self.ping_every / 4:  # not every sweep: probes are seconds apart
            self._probed_at = now
            for session in self.sessions.to_ping(now, self.ping_every):
                if session.stream is not None:
                    session.stream.ping(session.ping)
        for lease in self.sessions.overdue_receipts(now):
            stream = lease.session.stream
            if stream is not None and not stream.ended.is_set():
                stream.end("receipt not acknowledged in time; reconnect")
                self.stats.streams_ended += 1
            await self.settler.requeue_lease(lease, Reason.ACK_TIMEOUT, "worker did not acknowledge receipt in time")


class StatePublisher:
    """Tells the scheduler what changed about this dispatcher's workers, as soon as it changed.

    One publish in flight: what changes meanwhile goes in the next delta (group commit). A full
    snapshot goes out at least every `heartbeat` seconds, so a scheduler that missed a delta (or
    just started) is right again within it.
    """

    def __init__(
        self,
        *,
        sessions: Sessions,
        dispatcher_id: str,
        topology: amqp.Topology,
        confirm_timeout: float,
        heartbeat: float,
        clock: Callable[[], float],
        draining: Callable[[], bool],
        user_id: str | None = None,
    ) -> None:
        self.sessions, self.dispatcher_id, self.topology = sessions, dispatcher_id, topology
        self.user_id = user_id
        self.confirm_timeout, self.heartbeat, self.clock, self.draining = confirm_timeout, heartbeat, clock, draining
        # Starts from the clock so that a restarted dispatcher keeping its id is not taken for stale.
        self.seq = now_ms() * 1000
        self.epoch = uuid.uuid4().hex  # a seq counts only within one run (a forged one cannot outlast it)
        self._changed = asyncio.Event()
        self._full_at = float("-inf")
        self._was_draining = False
        sessions.on_change = self._changed.set
        self.published = 0

    async def run(self, exchange: AbstractExchange) -> None:
        while True:
            wait = self._full_at + self.heartbeat - self.clock()
            if wait > 0 and not self._due():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
            self._changed.clear()
            try:
                await self.publish(exchange)
            except (PublishError, Unroutable) as err:
                log.warning("worker state not published: %s", err)
                self._full_at = float("-inf")  # the changes it carried go out whole in the next one
                await asyncio.sleep(0.2)

    def _due(self) -> bool:
        return bool(self.sessions.dirty or self.sessions.gone) or self.draining() != self._was_draining

    async def publish(self, exchange: AbstractExchange, *, full: bool | None = None) -> None:
        """Publish a delta (or, when a heartbeat is due or asked, a full snapshot)."""
        if full is None:
            full = self.clock() - self._full_at >= self.heartbeat or self.draining() != self._was_draining
        changed, gone = self.sessions.take_changes()
        draining = self.draining()
        self.seq += 1
        state = messages_pb2.DispatcherState(
            dispatcher_id=self.dispatcher_id,
            seq=self.seq,
            at_ms=now_ms(),
            draining=draining,
            delta=not full,
            epoch=self.epoch,
        )
        # Sessions remember monotonic times; the state carries wall-clock ones.
        wall_offset = now_ms() - int(self.clock() * 1000)
        for session in list(self.sessions) if full else changed:
            state.workers.append(_worker_state(session, draining, wall_offset))
        if not full:
            state.gone.extend(gone)
        # Running tasks per concurrency key, which the scheduler caps across dispatchers.
        for (tenant, action, key), count in sorted(self.sessions.key_leases().items()):
            state.key_leases.append(messages_pb2.KeyLeases(tenant=tenant, action=action, key=key, count=count))
        if full:
            self._full_at = self.clock()
        self._was_draining = draining
        # Not mandatory: with no scheduler running nobody needs the snapshot; the next one replaces it.
        await amqp.publish(
            exchange,
            self.topology.state_key(self.dispatcher_id),
            state.SerializeToString(),
            mandatory=False,
            persistent=False,
            timeout=self.confirm_timeout,
            user_id=self.user_id,  # what the scheduler checks the publisher by
        )
        self.published += 1


def _worker_state(session: WorkerSession, draining: bool, wall_offset: int) -> messages_pb2.WorkerState:
    return messages_pb2.WorkerState(
        worker_id=session.worker_id,
        session_id=session.session_id,
        tenant=session.tenant,
        actions=sorted(session.actions),
        labels=session.labels,
        slots=session.slots,
        free_slots=session.free_slots,
        ready=session.ready and not draining,
        received=session.received,
        prefetch=session.prefetch,
        last_seen_ms=int(session.last_seen * 1000) + wall_offset,
        leases=len(session.leases),
        principal=session.principal,
        received_by_partition=session.received_by_partition,
        acknowledged=session.acknowledged,
    )
