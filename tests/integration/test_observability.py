"""Traces, metrics and health: one trace per task across every hop, OTLP over the wire, a scrape that adds up."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from sluicegate import telemetry
from sluicegate.metrics import MetricsServer
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2
from sluicegate.worker import TaskContext, Worker

from .conftest import Stack, eventually

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process records, kept in memory (the global provider can be set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        telemetry.install(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


async def test_one_trace_follows_a_requeued_task_from_submit_to_result(
    stack: Stack, spans: InMemorySpanExporter
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    flaky = Worker(f"127.0.0.1:{dispatcher.port}", slots=2, worker_id="flaky")

    @flaky.action("flaky")
    async def fail_first(ctx: TaskContext) -> bytes:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return b"ok"

    await stack.start_worker(dispatcher, "flaky", worker=flaky)
    await stack.wait_workers_known(1)
    client = await stack.client()

    task_id = await client.submit("flaky", b"", max_retries=1)
    result = await client.result(task_id, timeout=15)
    assert result.status == messages_pb2.TASK_STATUS_COMPLETED

    def task_spans() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if (s.attributes or {}).get("sluicegate.task.id") == task_id]

    for _ in range(100):  # the worker's run span ends after its report is accepted; give it a moment
        done = task_spans()
        if any(s.name == "result" for s in done) and sum(s.name == "run flaky" for s in done) == 2:
            break
        await asyncio.sleep(0.02)
    mine = task_spans()
    assert len({s.context.trace_id for s in mine}) == 1, "one trace per task"
    trace_id = mine[0].context.trace_id
    everything = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in everything}

    def parent_name(span: ReadableSpan) -> str | None:
        return by_id[span.parent.span_id].name if span.parent else None

    def one(name: str, attempt: int | None = None) -> ReadableSpan:
        found = [
            s
            for s in everything
            if s.name == name and (attempt is None or (s.attributes or {}).get("sluicegate.task.attempt") == attempt)
        ]
        assert len(found) == 1, f"{name} (attempt {attempt}): {[s.name for s in everything]}"
        return found[0]

    assert parent_name(one("submit flaky")) is None
    assert parent_name(one("assign flaky", 1)) == "submit flaky"
    first = one("dispatch flaky", 1)
    assert parent_name(first) == "assign flaky"
    assert parent_name(one("run flaky", 1)) == "dispatch flaky"
    assert one("run flaky", 1).status.status_code == trace.StatusCode.ERROR
    requeue = one("requeue", 1)
    assert requeue.parent is not None
    assert requeue.parent.span_id == first.context.span_id
    assert (requeue.attributes or {})["sluicegate.requeue.reason"] == Reason.HANDLER_FAILED.value
    reassign = one("reassign flaky", 2)
    assert parent_name(reassign) == "requeue"
    second = one("dispatch flaky", 2)
    assert second.parent is not None
    assert second.parent.span_id == reassign.context.span_id
    run = one("run flaky", 2)
    assert run.parent is not None
    assert run.parent.span_id == second.context.span_id
    complete = one("complete flaky", 2)
    assert complete.parent is not None
    assert complete.parent.span_id == second.context.span_id
    assert parent_name(one("result", 2)) == "complete flaky"
    waits = [s for s in everything if s.name == "send_lock.wait"]
    writes = [s for s in everything if s.name == "stream.write"]
    assert {parent_name(s) for s in waits + writes} == {"dispatch flaky"}
    assert len(waits) == len(writes) == 2
    for wait, write in zip(
        sorted(waits, key=lambda s: s.start_time or 0), sorted(writes, key=lambda s: s.start_time or 0), strict=True
    ):
        assert (wait.end_time or 0) <= (write.start_time or 0) + 1, "the wait ends where the write begins"
    assert (first.attributes or {})["messaging.system"] == "rabbitmq"


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_a_real_otlp_receiver_over_grpc(stack: Stack) -> None:
    receiver = _Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {
            **os.environ,
            "RABBITMQ_URL": stack.broker.rabbitmq_url.get_secret_value(),
            "SLUICEGATE_PREFIX": stack.broker.prefix,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_SERVICE_NAME": "otlp-check",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluicegate", "submit", "echo", '{"n": 1}', "--no-wait",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
    finally:
        await server.stop(None)
    task_id = out.decode().strip()
    exported = [
        (resource_spans.resource, span)
        for request in receiver.requests
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    names = {span.name for _, span in exported}
    assert "submit echo" in names
    resource, submit = next((r, s) for r, s in exported if s.name == "submit echo")
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "otlp-check"
    assert {a.key: a.value.string_value for a in submit.attributes}["sluicegate.task.id"] == task_id


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_endpoint_reports_what_happened(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = await stack.start_worker(dispatcher, "metered", slots=4)
    await stack.wait_workers_known(1)
    client = await stack.client()

    ids = await client.submit_many([__import__("sluicegate").TaskSpec("echo", b"x") for _ in range(20)])
    ids.append(await client.submit("fail", None))
    await asyncio.wait_for(asyncio.gather(*(client.result(i) for i in ids)), 30)
    # The dispatcher counts a result once its publish is confirmed, which can be just after the
    # client has it.
    await eventually(lambda: dispatcher.stats.completed + dispatcher.stats.failed == 21, timeout=10)

    async with (
        MetricsServer(dispatcher.metrics.registry, host="127.0.0.1", port=0, ready=lambda: dispatcher.ready) as d,
        MetricsServer(scheduler.metrics.registry, host="127.0.0.1", port=0, ready=lambda: scheduler.ready) as s,
        MetricsServer(worker.metrics(), host="127.0.0.1", port=0, ready=worker.registered.is_set) as w,
    ):
        status, text = await asyncio.to_thread(_scrape, d.port)
        assert status == 200
        dm = _samples(text)
        _, stext = await asyncio.to_thread(_scrape, s.port)
        sm = _samples(stext)
        _, wtext = await asyncio.to_thread(_scrape, w.port)
        wm = _samples(wtext)
        assert await asyncio.to_thread(_scrape, d.port, "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(_scrape, d.port, "/readyz") == (200, "ready\n")
        assert (await asyncio.to_thread(_scrape, d.port, "/nope"))[0] == 404

    assert dm[("sluicegate_tasks_completed_total", (("status", "completed"),))] == 20
    assert dm[("sluicegate_tasks_completed_total", (("status", "failed"),))] == 1
    assert dm[("sluicegate_connected_workers", ())] == 1
    assert dm[("sluicegate_worker_slots", (("state", "total"),))] == 4
    assert dm[("sluicegate_worker_slots", (("state", "free"),))] == 4
    assert dm[("sluicegate_leases_in_flight", ())] == 0
    assert dm[("sluicegate_send_lock_timeouts_total", ())] == 0
    assert dm[("sluicegate_send_lock_waits_extended_total", ())] == 0
    assert dm[("sluicegate_tasks_forwarded_total", ())] == 21
    # Several assignments for one worker can share a stream write: one lock wait and one write each.
    writes = dm[("sluicegate_stream_write_seconds_count", ())]
    assert 1 <= writes <= 21
    assert dm[("sluicegate_send_lock_wait_seconds_count", ())] == writes
    for name in ("receipt_ack", "task_latency"):
        assert dm[(f"sluicegate_{name}_seconds_count", ())] == 21, name
    assert dm[("sluicegate_batch_size_sum", (("kind", "assignments"),))] == 21
    assert dm[("sluicegate_batch_size_sum", (("kind", "results"),))] == 21
    assert sm[("sluicegate_tasks_assigned_total", ())] == 21
    assert sm[("sluicegate_tasks_received_total", ())] == 21
    assert all(
        sm[("sluicegate_waiting_tasks", (("reason", r),))] == 0 for r in ("no_worker", "at_limit", "busy", "delayed")
    )
    assert sm[("sluicegate_batch_size_sum", (("kind", "assignments"),))] == 21
    assert sm[("sluicegate_known_workers", ())] == 1
    assert wm[("sluicegate_worker_tasks_total", (("status", "completed"),))] == 20
    assert wm[("sluicegate_worker_tasks_total", (("status", "failed"),))] == 1

    await dispatcher.close()
    assert not dispatcher.ready
