"""The dispatcher's gRPC guard: authenticates every call and sets its principal for the handler.

A thin shell over `sluicegate.auth`: it reads the `authorization` metadata (a token) or the peer's
verified client certificate, asks the policy whether that principal may call the method, and runs
the handler with `auth.current` set. A call that fails gets UNAUTHENTICATED or PERMISSION_DENIED
with a short reason, never the handler.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from sluicegate import auth
from sluicegate.errors import InvalidInput, PermissionDenied, Unauthenticated
from sluicegate_dispatcher.settings import DispatcherSettings

log = logging.getLogger(__name__)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks credentials on every RPC but the health service's."""

    def __init__(
        self,
        keys: auth.KeyFile | None,
        *,
        certificates: bool,
        refused: Counter[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.refused = refused if refused is not None else Counter()  # by code, for the metrics
        self.certificates = certificates  # client certificates are verified by TLS and name a principal
        self.wall_clock = wall_clock

    def authenticate(self, metadata: Any, auth_context: Mapping[str, Iterable[bytes]]) -> auth.Principal:
        token = auth.bearer(metadata or ())
        if token is not None:
            if self.keys is None:
                raise Unauthenticated("this dispatcher does not take tokens; present a client certificate")
            return auth.verify(token, self.keys.keys, now=self.wall_clock())
        pem = next(iter(auth_context.get("x509_pem_cert") or [b""]), b"")
        if self.certificates and pem:
            return auth.from_certificate(pem)
        raise Unauthenticated("credentials are required (authorization: Bearer <token>)")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method = details.method
        if handler is None or method in auth.OPEN_METHODS:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guarded(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guarded(handler.stream_stream, method, streaming=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return _refuse_all(handler, method)

    def _guarded(self, behavior: Callable[..., Any], method: str, *, streaming: bool = False) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                principal = self.authenticate(context.invocation_metadata(), context.auth_context())
                auth.authorize(principal, method)
            except Unauthenticated as err:
                self.refused["unauthenticated"] += 1
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
            except PermissionDenied as err:
                self.refused["permission_denied"] += 1
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            token = auth.current.set(principal)
            try:
                if not streaming or principal.expires_at is None:
                    return await behavior(request, context)
                # A stream lives for hours: it must not outlive the credentials it was opened with.
                return await self._until_expiry(behavior(request, context), principal.expires_at, context)
            finally:
                auth.current.reset(token)

        return guarded

    async def _until_expiry(
        self, call: Awaitable[Any], expires_at: float, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """Serve the stream until the credentials expire, then end it UNAUTHENTICATED.

        The worker opens the stream again (the same session, its running tasks untouched) with the
        token it holds by then; an expired or stolen token gets nothing more.
        """
        try:
            async with asyncio.timeout(max(0.0, expires_at - self.wall_clock())):
                return await call
        except TimeoutError:
            self.refused["unauthenticated"] += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the credentials have expired; open the stream again")


def _refuse_all(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A method of a kind the dispatcher does not serve under guard: refused rather than left open."""
    log.warning("refusing %s: no guard for its kind of call", method)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not available")

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer)
    return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the {what} {path.name!r}: {err.strerror}") from None


def server_credentials(settings: DispatcherSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain = _read(settings.tls_cert, "TLS certificate")
    key = _read(settings.tls_key, "TLS key")
    roots = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=settings.tls_require_client_cert
    )


def interceptor(settings: DispatcherSettings, refused: Counter[str]) -> AuthInterceptor | None:
    """The guard when credentials are configured, else None (every call is let through)."""
    if not settings.authenticated:
        return None
    keys = auth.KeyFile(settings.auth_keys) if settings.auth_keys is not None else None
    return AuthInterceptor(keys, certificates=settings.tls_client_ca is not None, refused=refused)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or all interfaces


def check_exposure(settings: DispatcherSettings) -> None:
    """Refuse an address beyond loopback without TLS and credentials, unless told `insecure`."""
    if is_loopback(settings.listen) or (settings.tls and settings.authenticated):
        return
    missing = " and ".join(
        what for what, there in (("TLS", settings.tls), ("credentials", settings.authenticated)) if not there
    )
    if not settings.insecure:
        raise InvalidInput(
            f"refusing to listen on {settings.listen} without {missing}: set SLUICEGATE_DISPATCHER_TLS_CERT and "
            "_TLS_KEY, and SLUICEGATE_DISPATCHER_AUTH_KEYS or _TLS_CLIENT_CA (see README, Security), "
            "or pass --insecure"
        )
    log.warning(
        "listening on %s without %s (--insecure): anyone who reaches it can act as any worker", settings.listen, missing
    )
