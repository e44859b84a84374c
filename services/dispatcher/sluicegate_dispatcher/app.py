"""The dispatcher process: consumes its inbox, forwards assignments over worker streams, settles them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import grpc
from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sluicegate import amqp, lifecycle, telemetry
from sluicegate.errors import InvalidInput
from sluicegate.reasons import Reason
from sluicegate.settings import BrokerSettings
from sluicegate.setup_checks import check_listen
from sluicegate.v1 import worker_pb2, worker_pb2_grpc
from sluicegate.wire import grpc_options
from sluicegate_dispatcher import guard
from sluicegate_dispatcher.forwarding import Forwarder
from sluicegate_dispatcher.housekeeping import Reaper, StatePublisher
from sluicegate_dispatcher.metrics import DispatcherMetrics
from sluicegate_dispatcher.reports import Reports
from sluicegate_dispatcher.service import EdgeSettings, WorkerServicer
from sluicegate_dispatcher.sessions import Sessions
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_dispatcher.settlement import Settler
from sluicegate_dispatcher.stats import DispatcherStats
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)

SERVICE_NAME = "sluicegate.v1.WorkerService"


class Dispatcher:
    """Serves worker sessions over gRPC and forwards the assignments its inbox receives.

    Every assignment of an inbox message ends in exactly one of: a terminal result published, or a
    confirmed republish to `requeue` with its reason. The message is acked once all of its
    assignments have ended that way; until then it is the lease, and if this process dies the
    broker dead-letters it to `requeue` when its TTL has passed.
    """

    def __init__(
        self,
        settings: DispatcherSettings,
        broker: BrokerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        lifecycle_settings: lifecycle.LifecycleSettings | None = None,
    ) -> None:
        s = self.settings = settings
        self.broker = broker
        self.clock = clock
        self.topology = amqp.Topology(broker.prefix)
        self.sessions = Sessions(receipt_window=settings.receipt_window, prefetch=settings.worker_prefetch)
        self.stats = DispatcherStats()
        self.lifecycle = lifecycle.LifecycleEmitter(
            self.topology, "dispatcher", lifecycle_settings, confirm_timeout=broker.confirm_timeout_s
        )
        self.metrics = DispatcherMetrics(self.sessions, self.stats, self.lifecycle)
        self._exchanges = amqp.Exchanges(self.topology)
        self.settler = Settler(
            topology=self.topology,
            broker=broker,
            exchanges=self._exchanges,
            sessions=self.sessions,
            stats=self.stats,
            metrics=self.metrics,
            emitter=self.lifecycle,
        )
        self.forwarder = Forwarder(
            sessions=self.sessions,
            settler=self.settler,
            stats=self.stats,
            metrics=self.metrics,
            inbox=self.topology.inbox(s.id),
            lock_timeout=s.send_lock_timeout.total_seconds(),
            ack_timeout=s.ack_timeout.total_seconds(),
            max_payload=s.max_payload_bytes,
            clock=clock,
            draining=lambda: self.draining,
        )
        self.reports = Reports(
            sessions=self.sessions,
            settler=self.settler,
            stats=self.stats,
            metrics=self.metrics,
            emitter=self.lifecycle,
            dispatcher_id=s.id,
            clock=clock,
            spawn=self._spawn,
            run_grace=s.run_grace.total_seconds(),
            cancel_grace=s.cancel_grace.total_seconds(),
        )
        self.reaper = Reaper(
            sessions=self.sessions,
            settler=self.settler,
            stats=self.stats,
            heartbeat_timeout=s.heartbeat_timeout.total_seconds(),
            reconnect_grace=s.reconnect_grace.total_seconds(),
            clock=clock,
            sweep=self.reports.sweep,
        )
        self.state = StatePublisher(
            sessions=self.sessions,
            dispatcher_id=s.id,
            topology=self.topology,
            confirm_timeout=broker.confirm_timeout_s,
            heartbeat=s.state_heartbeat.total_seconds(),
            clock=clock,
            draining=lambda: self.draining,
            user_id=broker.user,
        )
        self.servicer = WorkerServicer(
            settings=EdgeSettings(
                dispatcher_id=s.id,
                heartbeat_interval_ms=int(s.heartbeat_interval.total_seconds() * 1000),
                lock_timeout=s.send_lock_timeout.total_seconds(),
                send_lock_permits=s.send_lock_permits,
            ),
            sessions=self.sessions,
            settler=self.settler,
            reports=self.reports,
            forwarder=self.forwarder,
            clock=clock,
            draining=lambda: self.draining,
            refused=self.stats.refused,
        )
        self.port = 0
        self.draining = False
        self.failed: BaseException | None = None
        self._state = "new"
        self._connection: AbstractRobustConnection | None = None
        self._inbox: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def ready(self) -> bool:
        """Serving and taking new work (false while starting, draining, stopped or after a crashed loop)."""
        return self._state == "running" and not self.draining and self.failed is None

    # Lifecycle.

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"dispatcher is {self._state}")
        self._state = "starting"
        s = self.settings
        check_listen(s.listen, "the gRPC address")  # a bad or taken address is said first
        guard.check_exposure(s)  # then whether it may be reached from beyond this machine
        credentials = guard.server_credentials(s)
        checker = guard.interceptor(s, self.stats.refused)
        self._server = grpc.aio.server(
            interceptors=[*telemetry.grpc_server_interceptors(), *([checker] if checker else [])],
            options=grpc_options(
                keepalive_s=s.keepalive_time.total_seconds(),
                keepalive_timeout_s=s.keepalive_timeout.total_seconds(),
                max_payload=s.max_payload_bytes,
                server=True,
            ),
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = bind(self._server, s.listen, credentials)  # before the broker: a taken port is a setup error
        self._connection = await amqp.connect_broker(self.broker)
        publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._exchanges.declare(publish_channel)
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=s.prefetch)
        inbox_exchange = await consume_channel.get_exchange(self.topology.assign)
        self._inbox = await amqp.declare_bound_queue(
            consume_channel,
            inbox_exchange,
            self.topology.inbox(self.id),
            amqp.inbox_arguments(self.topology, s.inbox_ttl, s.inbox_expires),
            routing_key=self.id,
        )
        await self._server.start()
        self._runner = asyncio.create_task(self._supervise(), name="dispatcher")
        await self._started.wait()
        # Every cancellation still on the stream first (a restart forgets none), then each new one.
        await amqp.follow_cancels(self._connection, self.topology, self.reports.on_cancels)
        self._consumer_tag = await self._inbox.consume(self.forwarder.on_message)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._state = "running"
        security = ("TLS" if s.tls else "plaintext") + (", credentials required" if s.authenticated else "")
        log.info("dispatcher %s listening on port %d (%s)", self.id, self.port, security)

    async def _supervise(self) -> None:
        """One TaskGroup for the process's loops and settlements: a crash is logged and fails readiness."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self.reaper.run(), name="dispatcher-reaper")
                group.create_task(self.state.run(self._exchanges.events), name="dispatcher-state")
                group.create_task(self.lifecycle.run(self._exchanges.events), name="dispatcher-lifecycle")
                self._started.set()
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self.failed = err
            log.exception("dispatcher stopped on an unexpected error")
            with contextlib.suppress(Exception):
                await self._health.enter_graceful_shutdown()
        finally:
            self._group = None
            self._started.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._group is None:
            coro.close()  # stopping: the lease stays unsettled and the broker gives it back
            return
        self._group.create_task(coro)

    async def close(self) -> None:
        """Drain and stop; idempotent, never raises."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        with contextlib.suppress(Exception):
            await self._drain()
        # Lifecycle events are records, not tasks: they never hold a stop for long.
        with contextlib.suppress(Exception):
            await self.lifecycle.drain(timeout=min(self.broker.confirm_timeout_s, 2.0))
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
        with contextlib.suppress(Exception):
            await self.settler.close()
        await self.servicer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop(grace=1.0)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._state = "closed"

    async def _drain(self) -> None:
        """Stop taking work, let running tasks finish within the grace, requeue the rest."""
        if self._server is None or self._state == "new":
            return
        self.draining = True
        await self._health.enter_graceful_shutdown()
        with contextlib.suppress(Exception):
            await self.state.publish(self._exchanges.events, full=True)
        deadline = self.clock() + self.settings.drain_grace.total_seconds()
        while self.sessions.leases and self.clock() < deadline:  # noqa: ASYNC110 - leases settle from many tasks
            await asyncio.sleep(0.05)
        if self._inbox is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._inbox.cancel(self._consumer_tag)
        for session in self.sessions:
            stream = session.stream
            await self.settler.requeue_settled(self.sessions.close(session), Reason.DRAINING, "dispatcher stopping")
            if stream is not None:
                await self._tell_reconnect(stream)
        with contextlib.suppress(Exception):
            await self.state.publish(self._exchanges.events, full=True)

    async def _tell_reconnect(self, stream: WorkerStream) -> None:
        control = worker_pb2.Control(kind=worker_pb2.Control.KIND_RECONNECT, reason="dispatcher stopping")
        with contextlib.suppress(Exception):
            await stream.send(
                worker_pb2.ServerMessage(controls=[control]), self.settings.send_lock_timeout.total_seconds()
            )
        stream.end("dispatcher stopping")


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind the gRPC port (never shared: reuse-port is off); a taken or bad address is one clear error."""
    check_listen(listen, "the gRPC address")  # first, so grpc's own error lines are never reached
    try:
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        raise InvalidInput(f"cannot listen on {listen}: the address is taken or invalid") from err
    if port == 0:
        raise InvalidInput(f"cannot listen on {listen}: the address is taken or invalid")
    return port
