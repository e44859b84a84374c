"""deploy/local/otlp_receiver.py, the compose stack's stand-in for Jaeger: real OTLP exports in, traces by id out."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def receiver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sluicegate_otlp_receiver", ROOT / "deploy/local/otlp_receiver.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _export(grpc_port: int, service: str, names: list[str], parent: Any = None) -> Any:
    """Spans from a process calling itself `service`, over OTLP/gRPC as Sluicegate exports them."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{grpc_port}")))
    tracer = provider.get_tracer("test")
    from opentelemetry import trace

    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
    first = None
    for name in names:
        with tracer.start_as_current_span(name, context=context) as span:
            first = first or span.get_span_context()
    provider.shutdown()
    return first


@pytest.mark.timeout(60)
async def test_traces_are_listed_with_every_service_that_sent_spans(receiver: ModuleType) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    started = asyncio.Event()
    server = asyncio.create_task(receiver.run(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", 2, started))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert await asyncio.to_thread(_get, http_port, "/healthz") == (200, b"ok\n")
        root = await asyncio.to_thread(_export, grpc_port, "sluicegate-producer", ["submit echo"])
        await asyncio.to_thread(_export, grpc_port, "sluicegate-worker", ["run echo"], root)
        status, body = await asyncio.to_thread(_get, http_port, "/traces")
        assert status == 200
        traces = json.loads(body)
        one = traces[format(root.trace_id, "032x")]
        assert one == {"services": ["sluicegate-producer", "sluicegate-worker"], "spans": ["submit echo", "run echo"]}

        # Only the newest `keep` (2 here) traces are held.
        for name in ("second", "third"):
            await asyncio.to_thread(_export, grpc_port, "other", [name])
        traces = json.loads((await asyncio.to_thread(_get, http_port, "/traces"))[1])
        assert sorted(t["spans"][0] for t in traces.values()) == ["second", "third"]
        assert (await asyncio.to_thread(_get, http_port, "/nope"))[0] == 404
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
