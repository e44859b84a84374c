"""The worker SDK: register handlers, run them within slots, acknowledge, report, heartbeat, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from sluicegate import retry, telemetry
from sluicegate.attempts import Attempts, Handler, TaskContext, WorkerStats
from sluicegate.errors import InvalidInput
from sluicegate.metrics import Snapshot, counter, gauge, labelled_counter
from sluicegate.reporting import Backoff, Reporter, SessionLost
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.validation import check_action, check_labels
from sluicegate.wire import grpc_options
from sluicegate.worker_settings import WorkerSettings

__all__ = ["TaskContext", "Worker", "WorkerSettings"]

log = logging.getLogger(__name__)

Event = worker_pb2.TaskEvent
# How a stream's end shows on the worker's side; its status says what became of it.
STREAM_ENDINGS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)
Verdict = worker_pb2.EventVerdict
Key = tuple[str, int]


class Worker:
    """Runs registered handlers for the assignments a dispatcher streams to it.

    Each assignment is acknowledged before its handler runs; an attempt the dispatcher no longer
    holds (it timed out and went to another worker) is dropped, as is a duplicate (task, attempt).
    """

    def __init__(
        self,
        dispatchers: str | Sequence[str] | None = None,
        *,
        slots: int | None = None,
        worker_id: str = "",
        tenant: str | None = None,
        labels: dict[str, str] | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        base = settings or WorkerSettings()
        self.settings = base.model_copy(
            update={k: v for k, v in {"slots": slots, "tenant": tenant}.items() if v is not None}
        )
        raw = dispatchers if dispatchers is not None else self.settings.dispatchers
        self.addresses = [a.strip() for a in (raw.split(",") if isinstance(raw, str) else raw) if a.strip()]
        if not self.addresses:
            raise InvalidInput("a worker needs at least one dispatcher address")
        self.worker_id = worker_id
        self.labels = {**self.settings.labels, **(labels or {})}  # the constructor's win over the settings'
        check_labels(self.labels)
        self.stats = WorkerStats()
        self.attempts = Attempts(worker_id, self.settings, self.stats)
        self._options: dict[str, messages_pb2.ActionOptions] = {}
        self._reading = asyncio.Event()
        self._reading.set()
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._next_address = 0
        self.registered = asyncio.Event()

    def metrics(self) -> CollectorRegistry:
        """A registry with this worker's counters, read when scraped."""
        registry = CollectorRegistry()

        def snapshot() -> list[Metric]:
            s = self.stats
            return [
                counter("sluicegate_worker_assignments_received", "Assignments received.", s.received),
                labelled_counter(
                    "sluicegate_worker_tasks",
                    "Tasks run to the end, by outcome.",
                    "status",
                    {"completed": s.completed, "failed": s.failed},
                ),
                counter("sluicegate_worker_duplicates", "Duplicate assignments dropped.", s.duplicates),
                counter("sluicegate_worker_stale", "Attempts dropped because they were superseded.", s.stale),
                counter("sluicegate_worker_reconnects", "Streams or sessions opened again.", s.reconnects),
                gauge("sluicegate_worker_running", "Handlers running now.", len(self.attempts.running)),
            ]

        registry.register(Snapshot(snapshot))
        return registry

    def action(
        self,
        name: str,
        *,
        max_retries: int | None = None,
        backoff: retry.Backoff | messages_pb2.Backoff | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering an async handler for `name`, with its defaults (see `register`)."""

        def register(handler: Handler) -> Handler:
            self.register(name, handler, max_retries=max_retries, backoff=backoff)
            return handler

        return register

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        max_retries: int | None = None,
        backoff: retry.Backoff | messages_pb2.Backoff | None = None,
    ) -> None:
        """Serve `name` with `handler`.

        `max_retries` and `backoff` are this action's defaults, used for tasks that do not set
        their own: reruns after a retryable failure, and the wait before each (sluicegate.retry).
        """
        check_action(name)
        options = retry.action_options(name, max_retries, backoff)
        self.attempts.handlers[name] = handler
        if options.ListFields():
            self._options[name] = options
        else:
            self._options.pop(name, None)

    # Fault injection for tests and the demo: a worker that is alive but stops reading its stream.
    def stop_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def __aenter__(self) -> Worker:
        self._runner = asyncio.create_task(self.run(), name="sluicegate-worker")
        self._runner.add_done_callback(_log_crash)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop taking work, let running handlers finish within the grace, then disconnect."""
        self._stopping.set()
        self._reading.set()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner

    async def run(self) -> None:
        """Register and serve until stop(); reconnects with backoff and jitter."""
        if not self.attempts.handlers:
            raise InvalidInput("register at least one action before running the worker")
        backoff = Backoff(cap=self.settings.reconnect_max_backoff.total_seconds())
        while not self._stopping.is_set():
            address = self.addresses[self._next_address % len(self.addresses)]
            try:
                await self._serve(address, backoff)
            except* (grpc.aio.AioRpcError, SessionLost, OSError) as group:
                why = "; ".join(_why(e) for e in group.exceptions)
                log.info("worker %s: session on %s ended (%s); registering again", self.worker_id, address, why)
                self._next_address += 1
                self.stats.reconnects += 1
            if not self._stopping.is_set():
                await asyncio.sleep(backoff.next())

    async def _serve(self, address: str, backoff: Backoff) -> None:
        s = self.settings
        options = grpc_options(
            keepalive_s=s.keepalive_time.total_seconds(),
            keepalive_timeout_s=s.keepalive_timeout.total_seconds(),
            max_payload=s.max_payload_bytes,
            server=False,
        )
        channel = open_channel(address, s, options)
        metadata = self._metadata()
        async with channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            reply = await stub.Register(
                worker_pb2.RegisterRequest(
                    worker_id=self.worker_id,
                    tenant=s.tenant,
                    actions=sorted(self.attempts.handlers),
                    slots=s.slots,
                    labels=self.labels,
                    action_options=self._options,
                    answers_pings=True,
                ),
                timeout=10,
                metadata=metadata,
            )
            self.worker_id = self.attempts.worker_id = reply.worker_id
            self.stats.registrations += 1
            interval = reply.heartbeat_interval_ms / 1000 or s.heartbeat_interval.total_seconds()
            reporter = Reporter(s.max_payload_bytes, interval)
            backoff.reset()
            if not self.registered.is_set():
                log.info("worker %s registered with dispatcher %s at %s", self.worker_id, reply.dispatcher_id, address)
            self.registered.set()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._session(stub, reply.session_id, reporter, metadata))
                    group.create_task(self._until_stopped(reporter))
            except* _Stopped:
                pass
            finally:
                reporter.fail_all()
                for task in list(self.attempts.running.values()):
                    task.cancel()

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call carries: the token as it is now (read again each time: rotation needs no restart)."""
        token = self.settings.current_token()
        return (("authorization", f"Bearer {token}"),) if token else None

    async def _until_stopped(self, reporter: Reporter) -> None:
        """On stop, give running handlers the grace to finish and report, then end the session."""
        await self._stopping.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace.total_seconds()
        while self.attempts.running and loop.time() < deadline:
            await asyncio.wait(list(self.attempts.running.values()), timeout=deadline - loop.time())
        # Said on the stream, so that the dispatcher ends the session as a clean shutdown (INFO), not a loss.
        reporter.leave()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await reporter.left.wait()
        log.info("worker %s stopped", self.worker_id)
        raise _Stopped

    async def _session(
        self,
        stub: worker_pb2_grpc.WorkerServiceAsyncStub,
        session_id: str,
        reporter: Reporter,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        """The session's stream, opened again (same session) when it ends, until the session is lost."""
        backoff = Backoff(cap=1.0)
        hello = worker_pb2.WorkerMessage(worker_id=self.worker_id, session_id=session_id)
        unavailable = 0  # streams in a row that ended UNAVAILABLE without a single message
        while True:
            call = stub.Session(metadata=metadata)  # type: ignore[call-arg]  # written to, not fed an iterator
            heard = [False]
            tasks: list[asyncio.Task[None]] = []
            try:
                await call.write(hello)
                # Reading and writing end together: a write that fails means the stream is gone.
                tasks = [
                    asyncio.create_task(self._read(call, reporter, heard)),
                    asyncio.create_task(reporter.pump(call)),
                ]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    failure = task.exception()
                    if failure is not None and not isinstance(failure, STREAM_ENDINGS):
                        raise failure  # a reconnect asked for, or a bug: not the stream's end
            except STREAM_ENDINGS:
                pass
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
                reporter.stream_ended()
            code = await call.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise SessionLost("the dispatcher no longer knows this session")
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                fresh = self._metadata()
                if code == grpc.StatusCode.UNAUTHENTICATED and fresh != metadata:
                    # The token the stream was opened with expired, and a new one is at hand: the
                    # same session goes on over a new stream, its running tasks untouched.
                    metadata = fresh
                    self.stats.reconnects += 1
                    continue
                # The token expired or its key was retired: register again with the token as it is now.
                raise SessionLost(f"credentials refused ({code.name}: {await call.details()})")
            unavailable = 0 if heard[0] else unavailable + (code == grpc.StatusCode.UNAVAILABLE)
            if unavailable >= 3:
                # A dead dispatcher never answers NOT_FOUND: without this the worker would retry
                # it forever instead of registering with the next address it was given.
                raise SessionLost(f"dispatcher unreachable ({code.name}: {await call.details()})")
            if heard[0]:
                backoff.reset()
            log.debug("stream from dispatcher ended: %s", code.name)
            self.stats.reconnects += 1
            await asyncio.sleep(backoff.next())

    async def _read(self, call: Any, reporter: Reporter, heard: list[bool]) -> None:
        async for message in call:
            heard[0] = True
            await self._reading.wait()
            self._on_message(message, reporter)

    def _on_message(self, message: worker_pb2.ServerMessage, reporter: Reporter) -> None:
        reporter.answered(message.verdicts)
        if message.ping:
            reporter.pinged(message.ping)
        for control in message.controls:
            if control.kind == worker_pb2.Control.KIND_RECONNECT:
                raise SessionLost(control.reason or "dispatcher asked to reconnect")
            if control.kind == worker_pb2.Control.KIND_CANCEL:
                self.attempts.stop((control.task_id, control.attempt), control.reason)
        for assignment in message.assignments:
            self.attempts.accept(assignment, reporter)


def _read_file(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the {what} {path.name!r}: {err.strerror}") from None


def open_channel(address: str, settings: WorkerSettings, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to a dispatcher: TLS (with a client certificate, for mTLS) when configured."""
    interceptors = telemetry.grpc_client_interceptors()
    if not settings.secure:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_file(settings.tls_ca, "TLS CA"),
        private_key=_read_file(settings.tls_key, "TLS key"),
        certificate_chain=_read_file(settings.tls_cert, "TLS certificate"),
    )
    if settings.tls_server_name:
        options = [*options, ("grpc.ssl_target_name_override", settings.tls_server_name)]
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


class _Stopped(Exception):
    """Ends a worker session's task group when the worker is told to stop."""


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker stopped on an unexpected error", exc_info=task.exception())


def _why(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__
