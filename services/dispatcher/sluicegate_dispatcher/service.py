"""The gRPC edge of the dispatcher: decodes and validates requests, hands them on, maps errors to status codes.

Request bodies arrive as bytes (the methods are registered with no deserializer, see
`add_to_server`) and are decoded here, inside the error mapping: an undecodable body answers
INVALID_ARGUMENT like any other bad input, instead of an UNKNOWN with grpc's exception text and a
traceback in the log for every such call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from sluicegate import auth
from sluicegate.errors import (
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    SluicegateError,
    Unauthenticated,
    UnknownSession,
)
from sluicegate.ratelimit import QuietLog
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.validation import MAX_SLOTS, check_action, check_action_options, check_labels, check_tenant
from sluicegate_dispatcher.forwarding import Forwarder
from sluicegate_dispatcher.limits import Admission, EdgeLimits, check_events, check_registration
from sluicegate_dispatcher.reports import Reports
from sluicegate_dispatcher.sessions import Sessions, WorkerSession
from sluicegate_dispatcher.settlement import Settler
from sluicegate_dispatcher.stream import WorkerStream

log = logging.getLogger(__name__)
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the end of a stream's messages, untyped in the stubs

WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
FIRST_MESSAGE_TIMEOUT = 10.0
SERVICE = "sluicegate.v1.WorkerService"

R = TypeVar("R")
M = TypeVar("M", bound=Message)
Handler = Callable[..., Awaitable[R]]
PrincipalOf = Callable[[grpc.aio.ServicerContext[Any, Any]], str]


class Undecodable(InvalidInput):
    """A request body that is not the message it should be; the text says which, never why."""


def decode(kind: type[M], body: bytes | M) -> M:
    """The request as `kind`; raises Undecodable (INVALID_ARGUMENT) for bytes that are not one."""
    if isinstance(body, kind):
        return body  # decoded already (registered with a deserializer)
    if not isinstance(body, bytes):
        raise Undecodable(f"request body is not a {kind.DESCRIPTOR.name}")
    try:
        return kind.FromString(body)
    except (DecodeError, ValueError, RuntimeError) as err:  # bad UTF-8 in a string field, bad wire type, ...
        raise Undecodable(f"request body does not decode as a {kind.DESCRIPTOR.name}") from err


def peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The principal when the edge authenticates no one: the peer's host, without its port."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _status_for(err: SluicegateError) -> grpc.StatusCode:
    if isinstance(err, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
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
            if isinstance(err, Undecodable):
                self.undecodable(self.clock(), "%s: %s", method.__name__, err)
            await _abort(context, _status_for(err), str(err))
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error")
        return None  # type: ignore[return-value]  # the status could not be sent: the call ends without it

    return wrapper


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str) -> None:
    """End the call with `code`; raises AbortError as grpc expects, unless the status cannot be sent now.

    A write still pending on the stream (a worker that does not read) keeps the status from being
    sent; the call then ends when the worker reads again or its connection drops.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.debug("could not end a call with %s: a write is still pending", code.name)


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
    limits: EdgeLimits = field(default_factory=EdgeLimits)


def add_to_server(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
    """Register the worker service with bytes in: the servicer decodes, inside its error mapping."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=None,
            response_serializer=worker_pb2.RegisterResponse.SerializeToString,
        ),
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session,
            request_deserializer=None,
            response_serializer=worker_pb2.ServerMessage.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]


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
        principal_of: PrincipalOf = peer_host,
    ) -> None:
        self.settings, self.sessions, self.settler, self.reports = settings, sessions, settler, reports
        self.forwarder, self.clock, self.draining = forwarder, clock, draining
        self.refused = refused if refused is not None else Counter()  # calls denied here, by code
        # Who stands behind a call when no credentials name anyone (no key set, no client CA).
        self.principal_of = principal_of
        self.admission = Admission(settings.limits)
        self.undecodable = QuietLog(log, interval=10.0)
        self._stalls: set[asyncio.Task[None]] = set()
        self.owners = auth.Owners()  # worker id -> the principal that registered it (with credentials on)

    @edge
    async def Register(
        self, body: bytes | worker_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.RegisterResponse:
        request = decode(worker_pb2.RegisterRequest, body)
        if self.draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatcher is draining; register elsewhere")
        if request.worker_id and not WORKER_ID.match(request.worker_id):
            raise InvalidInput("worker_id must hold 1 to 128 letters, digits or _ . : -")
        tenant = request.tenant or "default"
        check_tenant(tenant)
        caller = auth.current.get()
        if not request.actions:
            raise InvalidInput("a worker must serve at least one action")
        check_registration(self.settings.limits, request.actions, request.labels)
        # Limits and a stall's cooldown follow the authenticated principal, else the peer's host.
        principal = caller.name if caller is not None else self.principal_of(context)
        self.admission.register(
            self.sessions, principal=principal, tenant=tenant, worker_id=request.worker_id, now=self.clock()
        )
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
            auth.check_tenant(caller, tenant)
            self.owners.claim(worker_id, caller)  # before anything changes: an impostor replaces nothing
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
            principal=principal,
            answers_pings=request.answers_pings,
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
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
                raw = await context.read()
        except TimeoutError as err:
            raise InvalidInput("a session stream starts with a message naming the session") from err
        if raw is EOF:
            raise InvalidInput("a session stream starts with a message naming the session")
        first = decode(worker_pb2.WorkerMessage, raw)
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
        if session.ping_unanswered_since is not None:
            stream.ping(session.ping)  # asked again on the new stream; its deadline stays
        failure: BaseException | None = None
        reader: asyncio.Task[None] | None = None
        ended: asyncio.Task[bool] | None = None
        try:
            try:
                self._handle(session, stream, first)
            except SluicegateError as err:  # the first message was too much already: nothing was applied
                failure = err
            else:
                reader = asyncio.create_task(self._read(session, stream, context))
                ended = asyncio.create_task(stream.ended.wait())
                await asyncio.wait([reader, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, ended):
                if task is not None:
                    task.cancel()
            self.sessions.detach(session, stream, self.clock())
        if reader is not None and reader.done() and not reader.cancelled():
            failure = reader.exception()
        # A write in flight first: a status sent meanwhile would fail (too many operations on the call).
        await stream.quiesce(self.settings.lock_timeout)
        if isinstance(failure, SluicegateError):
            raise failure
        await _abort(context, grpc.StatusCode.UNAVAILABLE, stream.reason or "stream ended")

    async def _read(
        self, session: WorkerSession, stream: WorkerStream, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Every message is a sign of life; its events are answered on the stream."""
        while (raw := await context.read()) is not EOF:
            self._handle(session, stream, decode(worker_pb2.WorkerMessage, raw))
        stream.end("the worker closed its stream")

    def _handle(self, session: WorkerSession, stream: WorkerStream, message: worker_pb2.WorkerMessage) -> None:
        """One worker message; its size and rate are checked before any of it is applied."""
        now = self.clock()
        if message.events:
            check_events(self.settings.limits, len(message.events))
        else:
            self.admission.heartbeat(session.session_id, now)
        self.sessions.seen(session, now)
        if message.pong:
            self.sessions.ponged(session, message.pong)
        if message.leaving:
            session.leaving = True
        if message.events:
            stream.answer(self.reports.on_events(session, message.events))

    def _on_stall(self, session: WorkerSession, stream: WorkerStream) -> bool:
        """A verdict could not get the stream's lock in time: handled as a send would be. True if stalled."""
        if self.forwarder.waits_on(session, stream):
            return False
        task = asyncio.create_task(self.forwarder.stalled(session, stream))
        self._stalls.add(task)
        task.add_done_callback(self._stalls.discard)
        return True

    async def close(self) -> None:
        for task in list(self._stalls):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._stalls, return_exceptions=True)
