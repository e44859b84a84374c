"""The attacks on workers' identity, tenants and the scheduler's view, each shown to do no harm.

Attack 1 (worker hijack): an impostor registers an honest worker's id, or streams with its leaked
session id. Attack 2 (tenant isolation): a worker claims a tenant its credentials do not name.
Attack 6 (part): a forged DispatcherState with seq 2^64-1 and a phantom ready worker. Every
certificate and key is made here, at test time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
from prometheus_client import generate_latest
from pydantic import SecretStr

from sluicegate import amqp, auth
from sluicegate.cli import demo_worker
from sluicegate.errors import InvalidInput
from sluicegate.reasons import Reason
from sluicegate.v1 import messages_pb2, worker_pb2, worker_pb2_grpc
from sluicegate.worker import Worker, WorkerSettings
from sluicegate_dispatcher.app import Dispatcher
from tests.tlsfiles import TestCA, make_ca

from .conftest import Stack, eventually

pytestmark = pytest.mark.timeout(120)
SERVICE = "/sluicegate.v1.WorkerService"


class Pki:
    """A CA, the dispatcher's certificate and a key set, all under one temporary folder."""

    def __init__(self, base: Path) -> None:
        self.ca: TestCA = make_ca(base / "ca")
        self.server = self.ca.issue_server("localhost")
        self.keys_path = base / "keys.json"
        auth.write_keys(self.keys_path, auth.KeySet(keys={}, issue="").with_new_key("k1"))

    @property
    def keys(self) -> auth.KeySet:
        return auth.KeyFile(self.keys_path).keys

    def token(
        self,
        principal: str,
        tenants: list[str],
        role: str = "worker",
        keys: auth.KeySet | None = None,
        ttl: timedelta = timedelta(hours=1),
    ) -> str:
        return auth.issue(keys or self.keys, principal=principal, role=role, tenants=tenants, ttl=ttl, now=time.time())

    def worker_settings(self, **extra: Any) -> WorkerSettings:
        return WorkerSettings(tls_ca=self.ca.cert, **extra)

    def channel(self, port: int, client: Any = None) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def secure_dispatcher(stack: Stack, pki: Pki, **extra: Any) -> Dispatcher:
    settings: dict[str, Any] = {"tls_cert": pki.server.cert, "tls_key": pki.server.key}
    settings.update(extra if extra else {"auth_keys": pki.keys_path})
    return await stack.start_dispatcher(**settings)


async def worker_on_token_file(
    stack: Stack, pki: Pki, token_file: Path, principal: str, ttl: timedelta = timedelta(hours=1)
) -> tuple[Dispatcher, Worker, Path]:
    """A scheduler, a TLS dispatcher taking tokens, and worker `w-<principal>` whose token is read from `token_file`."""
    await stack.start_scheduler()
    dispatcher = await secure_dispatcher(stack, pki)
    token_file.write_text(pki.token(principal, ["default"], ttl=ttl) + "\n")  # noqa: ASYNC240 - before anything runs
    worker_id = f"w-{principal}"
    worker = demo_worker(Stack.address(dispatcher), 4, worker_id, pki.worker_settings(token_file=token_file))
    await stack.start_worker(dispatcher, worker_id, worker=worker)
    return dispatcher, worker, token_file


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def register_request(worker_id: str, tenant: str = "default") -> worker_pb2.RegisterRequest:
    return worker_pb2.RegisterRequest(worker_id=worker_id, tenant=tenant, actions=["echo"], slots=4)


async def register_code(channel: grpc.aio.Channel, request: worker_pb2.RegisterRequest, metadata: Any = None) -> Any:
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    try:
        await stub.Register(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def run_echo(stack: Stack, count: int, tenant: str = "default") -> list[Any]:
    client = await stack.client()
    ids = [await client.submit("echo", f"task-{i}", tenant=tenant) for i in range(count)]
    return [await client.result(task_id, timeout=30) for task_id in ids]


def completed_by(results: list[Any], worker_id: str) -> int:
    return sum(r.status == messages_pb2.TASK_STATUS_COMPLETED and r.worker_id == worker_id for r in results)


async def test_worker_hijack_by_id_or_leaked_session_id_is_refused(stack: Stack, pki: Pki) -> None:
    await stack.start_scheduler()
    dispatcher = await secure_dispatcher(stack, pki)
    honest = demo_worker(
        Stack.address(dispatcher),
        4,
        "w-honest",
        pki.worker_settings(token=SecretStr(pki.token("fleet-a", ["default"]))),
    )
    await stack.start_worker(dispatcher, "w-honest", worker=honest)
    await stack.wait_workers_known(1)
    port = dispatcher.port

    # Plaintext to a TLS port does not even get an answer.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        assert await register_code(plain, register_request("w-honest")) == grpc.StatusCode.UNAVAILABLE
    async with pki.channel(port) as channel:
        assert await register_code(channel, register_request("w-honest")) == grpc.StatusCode.UNAUTHENTICATED
        forged = pki.token("fleet-a", ["default"], keys=auth.KeySet(keys={}, issue="").with_new_key("k1"))
        assert await register_code(channel, register_request("w-honest"), bearer(forged)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        mallory = bearer(pki.token("mallory", ["default"]))
        assert await register_code(channel, register_request("w-honest"), mallory) == grpc.StatusCode.PERMISSION_DENIED
        client_role = bearer(pki.token("fleet-a", ["default"], role="client"))
        assert await register_code(channel, register_request("w-honest"), client_role) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # The session id is no secret (every DispatcherState names it): a stream needs the owner too.
        (view,) = [w for w in stack.scheduler.pool if w.worker_id == "w-honest"]  # type: ignore[union-attr]
        call = worker_pb2_grpc.WorkerServiceStub(channel).Session(metadata=mallory)
        await call.write(worker_pb2.WorkerMessage(worker_id="w-honest", session_id=view.session_id))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    results = await run_echo(stack, 50)
    assert completed_by(results, "w-honest") == 50
    assert all(r.output == f"task-{i}".encode() for i, r in enumerate(results))
    assert honest.stats.registrations == 1  # never replaced
    assert honest.stats.reconnects == 0
    # Counted, so that an operator sees the attempts: no credentials, a forged token (unauthenticated);
    # a client's token, the honest worker's id, its session (permission denied).
    assert dispatcher.stats.refused == {"unauthenticated": 2, "permission_denied": 3}
    exposition = generate_latest(dispatcher.metrics.registry).decode()
    assert 'sluicegate_calls_refused_total{code="permission_denied"} 3.0' in exposition


async def test_a_worker_gets_no_task_of_a_tenant_its_token_does_not_name(stack: Stack, pki: Pki) -> None:
    await stack.start_scheduler()
    dispatcher = await secure_dispatcher(stack, pki)
    address = Stack.address(dispatcher)
    acme = demo_worker(
        address, 4, "w-acme", pki.worker_settings(tenant="acme", token=SecretStr(pki.token("acme-fleet", ["acme"])))
    )
    beta = demo_worker(
        address, 4, "w-beta", pki.worker_settings(tenant="beta", token=SecretStr(pki.token("beta-fleet", ["beta"])))
    )
    await stack.start_worker(dispatcher, "w-acme", worker=acme)
    await stack.start_worker(dispatcher, "w-beta", worker=beta)
    async with pki.channel(dispatcher.port) as channel:
        beta_token = bearer(pki.token("beta-fleet", ["beta"]))
        code = await register_code(channel, register_request("w-claims-acme", tenant="acme"), beta_token)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    await stack.wait_workers_known(2)
    results = await run_echo(stack, 50, tenant="acme")
    assert completed_by(results, "w-acme") == 50
    assert beta.stats.received == 0
    assert {w.worker_id for w in stack.scheduler.pool} == {"w-acme", "w-beta"}  # type: ignore[union-attr]


async def test_mtls_the_client_certificate_names_the_worker(stack: Stack, pki: Pki) -> None:
    await stack.start_scheduler()
    dispatcher = await secure_dispatcher(stack, pki, tls_client_ca=pki.ca.cert, tls_require_client_cert=True)
    fleet = pki.ca.issue_client("fleet-c", tenants=["default"])
    worker = demo_worker(
        Stack.address(dispatcher), 4, "w-cert", pki.worker_settings(tls_cert=fleet.cert, tls_key=fleet.key)
    )
    await stack.start_worker(dispatcher, "w-cert", worker=worker)
    async with pki.channel(dispatcher.port, pki.ca.issue_client("fleet-d", tenants=["default"])) as channel:
        assert await register_code(channel, register_request("w-cert")) == grpc.StatusCode.PERMISSION_DENIED
        assert await register_code(channel, register_request("w-d")) == grpc.StatusCode.OK
    async with pki.channel(dispatcher.port) as no_certificate:
        assert await register_code(no_certificate, register_request("w-x")) == grpc.StatusCode.UNAVAILABLE
    stranger = make_ca(pki.ca.base.parent / "other-ca").issue_client("fleet-c", tenants=["default"])
    async with pki.channel(dispatcher.port, stranger) as channel:
        assert await register_code(channel, register_request("w-cert")) == grpc.StatusCode.UNAVAILABLE
    await stack.wait_workers_known(1)
    results = await run_echo(stack, 20)
    assert completed_by(results, "w-cert") == 20


async def test_keys_rotate_without_restarting_the_dispatcher_or_the_worker(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    dispatcher, worker, token_file = await worker_on_token_file(stack, pki, tmp_path / "worker.token", "fleet-r")
    old = pki.keys

    # Rotate: a new key, the worker's token re-issued with it, the old key retired.
    rotated = old.with_new_key("k2")
    auth.write_keys(pki.keys_path, rotated)
    token_file.write_text(pki.token("fleet-r", ["default"], keys=rotated) + "\n")
    auth.write_keys(pki.keys_path, auth.KeySet(keys={"k2": rotated.keys["k2"]}, issue="k2"))
    await asyncio.sleep(1.1)  # the dispatcher looks at the file at most once a second
    async with pki.channel(dispatcher.port) as channel:
        stale = bearer(pki.token("fleet-r", ["default"], keys=old))
        assert await register_code(channel, register_request("w-other"), stale) == grpc.StatusCode.UNAUTHENTICATED

    # The dispatcher forgets the worker's session: it registers again, with the token now in its file.
    (session,) = list(dispatcher.sessions)
    stream = session.stream
    await dispatcher.settler.requeue_settled(dispatcher.sessions.close(session), Reason.DRAINING, "test")
    stream.end("test: session forgotten")
    await eventually(lambda: worker.stats.registrations == 2, timeout=15)
    await stack.wait_workers_known(1)
    results = await run_echo(stack, 10)
    assert completed_by(results, "w-fleet-r") == 10


async def test_a_stream_ends_when_its_token_expires_and_a_renewed_token_carries_the_same_session_on(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    """A stream lives for hours; a token that expired (or was stolen and then expired) must not."""
    short = timedelta(seconds=1)
    dispatcher, worker, token_file = await worker_on_token_file(stack, pki, tmp_path / "worker.token", "fleet-e", short)
    await stack.wait_workers_known(1)
    (session,) = list(dispatcher.sessions)
    token_file.write_text(pki.token("fleet-e", ["default"]) + "\n")  # renewed, as a token agent would

    async with pki.channel(dispatcher.port) as channel:
        # Someone else's stream on a one-second token, never renewed: it ends when the token does
        # (its expiry plus the 5 s leeway tokens are verified with).
        short_lived = bearer(pki.token("fleet-x", ["default"], ttl=short))
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.Register(register_request("w-short"), metadata=short_lived, timeout=5)
        opened = time.monotonic()
        call = stub.Session(metadata=short_lived)
        await call.write(worker_pb2.WorkerMessage(worker_id=reply.worker_id, session_id=reply.session_id))
        async with asyncio.timeout(20):
            while not call.done():
                with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):  # ended meanwhile
                    await call.write(worker_pb2.WorkerMessage())  # heartbeats: alive, but no longer entitled
                await asyncio.sleep(0.5)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED, await call.details()
        assert 3 < time.monotonic() - opened < 10
        assert await register_code(channel, register_request("w-short"), short_lived) == grpc.StatusCode.UNAUTHENTICATED

    # The honest worker's stream ended the same way, and it went on with the token in its file: the
    # same session (not registered again), taking and finishing work.
    await eventually(lambda: worker.stats.reconnects >= 1, timeout=15)
    assert worker.stats.registrations == 1
    assert session.session_id in [s.session_id for s in dispatcher.sessions]
    results = await run_echo(stack, 10)
    assert completed_by(results, "w-fleet-e") == 10


async def test_a_forged_state_with_seq_2_64_does_not_lock_the_dispatcher_out(stack: Stack) -> None:
    scheduler = await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-honest", slots=8)
    await stack.wait_workers_known(1)

    forged = messages_pb2.DispatcherState(dispatcher_id=dispatcher.id, seq=2**64 - 1, delta=False)
    forged.workers.append(
        messages_pb2.WorkerState(
            worker_id="phantom", session_id="phantom-session", tenant="default", actions=["echo"],
            slots=1000, free_slots=1000, ready=True,
        )
    )  # fmt: skip
    connection = await aio_pika.connect_robust(stack.broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(amqp.Topology(stack.broker.prefix).events)
        await amqp.publish(events, amqp.Topology.state_key(dispatcher.id), forged.SerializeToString(), mandatory=False)
        await eventually(lambda: any(w.worker_id == "phantom" for w in scheduler.pool), timeout=5)
    # Within the dispatcher's next full snapshot (at least once a second) the view is honest again.
    await eventually(lambda: {w.worker_id for w in scheduler.pool} == {"w-honest"}, timeout=5)
    results = await run_echo(stack, 200)
    assert completed_by(results, "w-honest") == 200  # none dead, none lost


async def test_no_listening_beyond_loopback_without_tls_and_credentials(stack: Stack, pki: Pki) -> None:
    with pytest.raises(InvalidInput, match="--insecure"):
        await stack.start_dispatcher(listen="0.0.0.0:0")
    with pytest.raises(InvalidInput, match="credentials"):
        await stack.start_dispatcher(listen="0.0.0.0:0", tls_cert=pki.server.cert, tls_key=pki.server.key)
    assert (await stack.start_dispatcher(listen="0.0.0.0:0", insecure=True)).port > 0
    secured = await secure_dispatcher(stack, pki, listen="0.0.0.0:0", auth_keys=pki.keys_path)
    assert secured.port > 0
