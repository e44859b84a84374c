"""Prometheus metrics and health over HTTP: `/metrics`, `/healthz` (alive) and `/readyz` (taking work).

Counters and gauges are read from each service's own counters when scraped, so the hot path pays
nothing for them; only the histograms are observed as things happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field
from pydantic_settings import BaseSettings

from sluicegate.settings import settings_config

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a fraction of a millisecond (a free lock) up to the default send-lock timeout and beyond.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class MetricsSettings(BaseSettings):
    """Where a process serves /metrics, /healthz and /readyz; no port means no server."""

    model_config = settings_config("SLUICEGATE_METRICS_")

    port: int | None = Field(default=None, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    host: str = Field(default="0.0.0.0", min_length=1, description="Address the metrics server binds.")


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def labelled_counter(name: str, doc: str, label: str, values: Mapping[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class Snapshot(Collector):
    """A collector that asks a function for its metric families at scrape time."""

    def __init__(self, produce: Callable[[], Iterable[Metric]]) -> None:
        self._produce = produce

    def collect(self) -> Iterable[Metric]:
        return list(self._produce())


def histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: Iterable[float], labels: Iterable[str] = ()
) -> Histogram:
    return Histogram(name, doc, labelnames=tuple(labels), buckets=tuple(buckets), registry=registry)


class MetricsServer:
    """A small asyncio HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        ready: Callable[[], bool],
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registry, self.host, self.port = registry, host, port
        self._ready, self._alive = ready, alive
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MetricsServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _respond(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE
        if path in ("/healthz", "/livez"):
            ok = self._alive()
            return (200 if ok else 503), (b"ok\n" if ok else b"not alive\n"), "text/plain"
        if path == "/readyz":
            ok = self._ready()
            return (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), "text/plain"
        return 404, b"not found\n", "text/plain"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                del line  # headers are not needed
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, kind = 405, b"method not allowed\n", "text/plain"
            else:
                status, body, kind = self._respond(parts[1].split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
