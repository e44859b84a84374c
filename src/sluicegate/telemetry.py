"""Tracing: set-up from the standard OTEL_* variables, and the helpers every hop uses to carry context.

No endpoint configured means no exporter and no cost beyond the API's no-op spans. Context
travels per task in the protobuf bodies (`Task.trace`, `Assignment.trace`, `TaskResult.trace`)
and per message in AMQP headers; gRPC calls carry it in metadata through the instrumentation.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

TRACER = "sluicegate"
MESSAGING = {"messaging.system": "rabbitmq"}


def tracer() -> Tracer:
    return trace.get_tracer(TRACER)


_installed = False


def install(provider: Any) -> None:
    """Make `provider` the global tracer provider and turn span building on."""
    global _installed
    trace.set_tracer_provider(provider)
    _installed = True


_checked_at = -1.0


def enabled() -> bool:
    """Whether a tracer provider was installed; without one every span would be thrown away.

    Asking OpenTelemetry reads the environment, too slow for every span: the answer is kept, and
    while it is no it is asked again at most once a second (a provider installed later is seen).
    """
    global _installed, _checked_at
    if not _installed:
        now = time.monotonic()
        if now - _checked_at >= 1.0:
            _checked_at = now
            _installed = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _installed


def setup_tracing(service_name: str) -> Any | None:
    """Install an OTLP-exporting tracer provider if an endpoint is configured; returns it, or None.

    Honours OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG)
    and OTEL_SDK_DISABLED through the SDK itself.
    """
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"sluicegate-{service_name}")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(provider)
    return provider


def shutdown_tracing(provider: Any | None) -> None:
    """Flush what is buffered; never raises."""
    if provider is not None:
        with contextlib.suppress(Exception):  # shutdown must not mask the real exit status
            provider.shutdown()


def parent(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a W3C carrier describes (an empty carrier gives a root)."""
    return propagate.extract(carrier)


def start(
    name: str,
    carrier: Mapping[str, str] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
) -> Span:
    """Start a span whose parent is the context in `carrier` (or the current one)."""
    if not enabled():
        return trace.INVALID_SPAN  # no provider: skip the work of building a span nobody keeps
    ctx = parent(carrier) if carrier else None
    return tracer().start_span(name, context=ctx, kind=kind, attributes=attributes, start_time=start_time)


def carry(span: Span, carrier: MutableMapping[str, str]) -> None:
    """Replace `carrier` with the W3C context of `span`, so the next hop's spans become its children."""
    carrier.clear()
    if span.get_span_context().is_valid:
        propagate.inject(carrier, context=trace.set_span_in_context(span))


def fail(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description))


def task_attributes(task_id: str, attempt: int | None = None, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"sluicegate.task.id": task_id, "messaging.message.id": task_id, **MESSAGING}
    if attempt is not None:
        attributes["sluicegate.task.attempt"] = attempt
    attributes.update({k: v for k, v in extra.items() if v is not None})
    return attributes


def grpc_filter() -> Any:
    """Trace every RPC but the long-lived session stream and health checks (a task's spans trace its hops)."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(filters.method_name("Session"), filters.health_check()))


def grpc_server_interceptors() -> Sequence[Any]:
    """The gRPC instrumentation, only when tracing is on: it costs a sixth of a dispatcher's CPU."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=grpc_filter())]  # type: ignore[no-untyped-call]


def grpc_client_interceptors() -> Sequence[Any]:
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=grpc_filter()))  # type: ignore[no-untyped-call]
