"""A small OTLP trace receiver standing in for Jaeger where no registry is reachable: it holds spans and who sent them.

    python otlp_receiver.py [--grpc 0.0.0.0:4317] [--http 0.0.0.0:16686] [--keep 20000]

It accepts OTLP over gRPC (`TraceService/Export`, what Sluicegate's exporter speaks) and answers
over HTTP:

    GET /traces    {"<trace id>": {"services": [...], "spans": [...]}, ...} for the traces it holds
    GET /healthz   ok

It runs in Sluicegate's own image, which has grpcio and the OTLP protobufs already. Only the
newest `--keep` traces are held. It is a test double for the compose stack's tracing, not a
tracing backend: no storage, no UI, no search.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Trace:
    services: set[str] = field(default_factory=set)
    spans: list[str] = field(default_factory=list)


class Traces:
    """The newest traces received, by trace id."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.by_id: OrderedDict[str, Trace] = OrderedDict()
        self.spans_received = 0

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "unknown")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    trace_id = span.trace_id.hex()
                    found = self.by_id.get(trace_id)
                    if found is None:
                        found = self.by_id[trace_id] = Trace()
                    found.services.add(service)
                    found.spans.append(span.name)
                    self.spans_received += 1
        while len(self.by_id) > self.keep:
            self.by_id.popitem(last=False)

    def as_json(self) -> bytes:
        body = {tid: {"services": sorted(t.services), "spans": t.spans} for tid, t in self.by_id.items()}
        return json.dumps(body).encode()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, traces: Traces) -> None:
        self.traces = traces

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.traces.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve_http(traces: Traces, address: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            if path == "/traces":
                status, kind, body = "200 OK", "application/json", traces.as_json()
            elif path == "/healthz":
                status, kind, body = "200 OK", "text/plain", b"ok\n"
            else:
                status, kind, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    host, port = _host_port(address)
    return await asyncio.start_server(handle, host, port)


async def run(grpc_address: str, http_address: str, keep: int, started: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or cancellation)."""
    traces = Traces(keep)
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(traces), server)
    server.add_insecure_port(grpc_address)
    await server.start()
    http = await serve_http(traces, http_address)
    print(f"otlp receiver: OTLP/gRPC on {grpc_address}, traces over HTTP on {http_address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        http.close()
        await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", default="0.0.0.0:4317", help="OTLP/gRPC address")
    parser.add_argument("--http", default="0.0.0.0:16686", help="address of GET /traces")
    parser.add_argument("--keep", type=int, default=20000, help="traces held at most")
    args = parser.parse_args()
    asyncio.run(run(args.grpc, args.http, args.keep))


if __name__ == "__main__":
    main()
