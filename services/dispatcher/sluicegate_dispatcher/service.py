"""The gRPC edge of the dispatcher: validates requests, calls the dispatcher, maps errors to status codes."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from sluicegate.errors import InvalidInput, PublishError, SluicegateError, UnknownSession
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.validation import MAX_SLOTS, check_action, check_action_options, check_labels, check_tenant
from sluicegate_dispatcher.stream import WorkerStream

if TYPE_CHECKING:
    from sluicegate_dispatcher.app import Dispatcher

log = logging.getLogger(__name__)

WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_EVENTS_PER_REPORT = 10_000
MAX_ACTIONS = 256

R = TypeVar("R")
Handler = Callable[..., Awaitable[R]]


def _status_for(err: SluicegateError) -> grpc.StatusCode:
    if isinstance(err, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, UnknownSession):
        return grpc.StatusCode.NOT_FOUND
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
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return wrapper


def _copied(options: messages_pb2.ActionOptions) -> messages_pb2.ActionOptions:
    copy = messages_pb2.ActionOptions()
    copy.CopyFrom(options)
    return copy


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher

    def _session(self, worker_id: str, session_id: str) -> Any:
        return self.d.sessions.session(worker_id, session_id)

    @edge
    async def Register(
        self, request: worker_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.RegisterResponse:
        if self.d.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatcher is draining; register elsewhere")
        if request.worker_id and not WORKER_ID.match(request.worker_id):
            raise InvalidInput("worker_id must hold 1 to 128 letters, digits or _ . : -")
        tenant = request.tenant or "default"
        check_tenant(tenant)
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
        session, previous = self.d.sessions.register(
            worker_id=request.worker_id,
            tenant=tenant,
            actions=frozenset(request.actions),
            labels=dict(request.labels),
            slots=request.slots,
            now=self.d.clock(),
            action_options={a: _copied(o) for a, o in request.action_options.items()},
        )
        if previous is not None:
            await self.d.lose_session(previous, Reason.WORKER_REREGISTERED, "worker registered again")
        log.info(
            "worker %s registered (%d slots, actions %s)", session.worker_id, session.slots, sorted(session.actions)
        )
        return worker_pb2.RegisterResponse(
            worker_id=session.worker_id,
            session_id=session.session_id,
            dispatcher_id=self.d.id,
            heartbeat_interval_ms=int(self.d.settings.heartbeat_interval.total_seconds() * 1000),
        )

    @edge
    async def Listen(  # type: ignore[override]  # writes go through the send lock, not a generator
        self, request: worker_pb2.ListenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        session = self._session(request.worker_id, request.session_id)
        if self.d.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatcher is draining; register elsewhere")
        stream = WorkerStream(context, self.d.settings.send_lock_permits)
        previous = self.d.sessions.attach(session, stream, self.d.clock())
        if previous is not None:
            previous.end("replaced by a newer stream")
        try:
            await stream.ended.wait()
        finally:
            self.d.sessions.detach(session, stream, self.d.clock())
        try:
            await context.abort(grpc.StatusCode.UNAVAILABLE, stream.reason or "stream ended")
        except grpc.aio.AbortError:
            raise
        except Exception:
            # A write still pending on a stalled stream keeps the status from being sent; the
            # call ends when the worker reads again or its connection drops.
            log.debug("could not end the stream of %s cleanly", session.worker_id)

    @edge
    async def Report(
        self, request: worker_pb2.ReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.ReportResponse:
        session = self._session(request.worker_id, request.session_id)
        if len(request.events) > MAX_EVENTS_PER_REPORT:
            raise InvalidInput(f"a report may carry at most {MAX_EVENTS_PER_REPORT} events")
        self.d.sessions.seen(session, self.d.clock())
        try:
            verdicts = await self.d.report(session, request.events)
        except PublishError as err:
            raise PublishError("the broker did not confirm a result; report again") from err
        return worker_pb2.ReportResponse(
            verdicts=[
                worker_pb2.EventVerdict(task_id=e.task_id, attempt=e.attempt, verdict=v)  # type: ignore[arg-type]
                for e, v in zip(request.events, verdicts, strict=True)
            ]
        )

    @edge
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.HeartbeatResponse:
        session = self._session(request.worker_id, request.session_id)
        self.d.sessions.seen(session, self.d.clock())
        return worker_pb2.HeartbeatResponse()
