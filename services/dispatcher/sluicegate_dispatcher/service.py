"""The gRPC edge of the dispatcher: validates requests, hands them on, maps errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import grpc

from sluicegate import auth
from sluicegate.errors import InvalidInput, PermissionDenied, SluicegateError, Unauthenticated, UnknownSession
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.validation import MAX_SLOTS, check_action, check_action_options, check_labels, check_tenant
from sluicegate_dispatcher.forwarding import Forwarder
from sluicegate_dispatcher.reports import Reports
from sluicegate_dispatcher.sessions import Sessions, WorkerSession
from sluicegate_dispatcher.settlement import Settler
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the end of a stream's messages, untyped in the stubs

WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_EVENTS_PER_MESSAGE = 10_000
MAX_ACTIONS = 256
FIRST_MESSAGE_TIMEOUT = 10.0

R = TypeVar("R")
Handler = Callable[..., Awaitable[R]]


def _status_for(err: SluicegateError) -> grpc.StatusCode:
    if isinstance(err, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, UnknownSession):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if err.retryable:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


def edge(method: Handler[R]) -> Handler[R]:
    """Map Sluicegate errors to status codes, and anything unexpected to INTERNAL without its text."""

    @wraps(method)
    async def wrapper(self: WorkerServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await method(self, request, context)
        except SluicegateError as err:
            await context.abort(_status_for(err), str(err))
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return wrapper


def _copied(options: messages_pb2.ActionOptions) -> messages_pb2.ActionOptions:
    copy = messages_pb2.ActionOptions()
    copy.CopyFrom(options)
    return copy


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    dispatcher_id: str
    heartbeat_interval_ms: int
    lock_timeout: float
    send_lock_permits: int


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        *,
        settings: EdgeSettings,
        sessions: Sessions,
        settler: Settler,
        reports: Reports,
        forwarder: Forwarder,
        clock: Callable[[], float],
        draining: Callable[[], bool],
        refused: Counter[str] | None = None,
    ) -> None:
        self.settings, self.sessions, self.settler, self.reports = settings, sessions, settler, reports
        self.forwarder, self.clock, self.draining = forwarder, clock, draining
        self.refused = refused if refused is not None else Counter()  # calls denied here, by code
        self._stalls: set[asyncio.Task[None]] = set()
        self.owners = auth.Owners()  # worker id -> the principal that registered it (with credentials on)

    @edge
    async def Register(
        self, request: worker_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.RegisterResponse:
        if self.draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatcher is draining; register elsewhere")
        if request.worker_id and not WORKER_ID.match(request.worker_id):
            raise InvalidInput("worker_id must hold 1 to 128 letters, digits or _ . : -")
        tenant = request.tenant or "default"
        check_tenant(tenant)
        principal = auth.current.get()
        if not request.actions:
            raise InvalidInput("a worker must serve at least one action")
        if len(request.actions) > MAX_ACTIONS:
            raise InvalidInput(f"a worker may serve at most {MAX_ACTIONS} actions")
        for action in request.actions:
            check_action(action)
        if not 1 <= request.slots <= MAX_SLOTS:
            raise InvalidInput(f"slots must be between 1 and {MAX_SLOTS}")
        check_labels(request.labels)
        for action, options in request.action_options.items():
            if action not in request.actions:
                raise InvalidInput(f"action_options names {action[:128]!r}, which the worker does not serve")
            check_action_options(action, options)
        worker_id = request.worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        try:
            auth.check_tenant(principal, tenant)
            self.owners.claim(worker_id, principal)  # before anything changes: an impostor replaces nothing
        except PermissionDenied:
            self.refused["permission_denied"] += 1
            raise
        session, previous = self.sessions.register(
            worker_id=worker_id,
            tenant=tenant,
            actions=frozenset(request.actions),
            labels=dict(request.labels),
            slots=request.slots,
            now=self.clock(),
            action_options={a: _copied(o) for a, o in request.action_options.items()},
        )
        if previous is not None:
            await self.settler.lose(previous, Reason.WORKER_REREGISTERED, "worker registered again")
        log.info(
            "worker %s registered (%d slots, actions %s)", session.worker_id, session.slots, sorted(session.actions)
        )
        return worker_pb2.RegisterResponse(
            worker_id=session.worker_id,
            session_id=session.session_id,
            dispatcher_id=self.settings.dispatcher_id,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
        )

    @edge
    async def Session(  # type: ignore[override]  # writes go through the send lock, not a generator
        self, requests: AsyncIterator[worker_pb2.WorkerMessage], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
                first = await context.read()
        except TimeoutError as err:
            raise InvalidInput("a session stream starts with a message naming the session") from err
        if first is EOF:
            raise InvalidInput("a session stream starts with a message naming the session")
        session = self.sessions.session(first.worker_id, first.session_id)
        try:
            self.owners.check(session.worker_id, auth.current.get())  # a leaked session id is not enough
        except PermissionDenied:
            self.refused["permission_denied"] += 1
            raise
        if self.draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatcher is draining; register elsewhere")
        stream = WorkerStream(
            context,
            self.settings.send_lock_permits,
            lock_timeout=self.settings.lock_timeout,
            on_stall=lambda stalled: self._on_stall(session, stalled),
        )
        previous = self.sessions.attach(session, stream, self.clock())
        if previous is not None:
            previous.end("replaced by a newer stream")
        self.forwarder.kick(session)  # what waited in its queue while it had no stream
        self.reports.retell(session)  # what it must stop, told again on the new stream
        self._handle(session, stream, first)
        reader = asyncio.create_task(self._read(session, stream, context))
        ended = asyncio.create_task(stream.ended.wait())
        try:
            await asyncio.wait([reader, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, ended):
                task.cancel()
            self.sessions.detach(session, stream, self.clock())
        failure = reader.exception() if reader.done() and not reader.cancelled() else None
        if isinstance(failure, SluicegateError):
            raise failure
        try:
            await context.abort(grpc.StatusCode.UNAVAILABLE, stream.reason or "stream ended")
        except grpc.aio.AbortError:
            raise
        except Exception:
            # A write still pending on a stalled stream keeps the status from being sent; the
            # call ends when the worker reads again or its connection drops.
            log.debug("could not end the stream of %s cleanly", session.worker_id)

    async def _read(
        self, session: WorkerSession, stream: WorkerStream, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Every message is a sign of life; its events are answered on the stream."""
        while (message := await context.read()) is not EOF:
            self._handle(session, stream, message)
        stream.end("the worker closed its stream")

    def _handle(self, session: WorkerSession, stream: WorkerStream, message: worker_pb2.WorkerMessage) -> None:
        self.sessions.seen(session, self.clock())
        if message.leaving:
            session.leaving = True
        if not message.events:
            return
        if len(message.events) > MAX_EVENTS_PER_MESSAGE:
            raise InvalidInput(f"a message may carry at most {MAX_EVENTS_PER_MESSAGE} events")
        stream.answer(self.reports.on_events(session, message.events))

    def _on_stall(self, session: WorkerSession, stream: WorkerStream) -> None:
        """A verdict could not get the stream's lock in time: handled as a stalled send."""
        task = asyncio.create_task(self.forwarder.stalled(session, stream))
        self._stalls.add(task)
        task.add_done_callback(self._stalls.discard)

    async def close(self) -> None:
        for task in list(self._stalls):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._stalls, return_exceptions=True)
