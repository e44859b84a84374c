"""Setup errors keep the promise: one line, exit 2 for bad input (found before connecting), 1 for a refused login."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from sluicegate.settings import BrokerSettings

from .conftest import Stack, eventually
from .store_helpers import run_cli

pytestmark = pytest.mark.timeout(90)

SECRET = "wr0ng-pa55"
UNREACHABLE = f"amqp://guest:{SECRET}@127.0.0.1:1/"  # had it connected, the error would be another


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sluicegate")
    assert SECRET not in err
    return lines[0]


async def test_a_wrong_password_is_reported_as_such_at_once(broker: BrokerSettings) -> None:
    url = broker.rabbitmq_url.get_secret_value().replace("guest:guest@", f"guest:{SECRET}@")
    assert SECRET in url, "the test broker's URL names the guest user"
    started = time.monotonic()
    code, _, err = await run_cli("submit", "echo", env={"RABBITMQ_URL": url})
    assert code == 1
    assert "refused the login of user 'guest'" in _one_line(err)
    assert time.monotonic() - started < 10  # not the 30 s of retries an unreachable broker gets


async def test_a_second_dispatcher_on_a_taken_grpc_port_fails(stack: Stack) -> None:
    first = await stack.start_dispatcher()
    code, _, err = await run_cli("dispatcher", "--listen", f"127.0.0.1:{first.port}", env={"RABBITMQ_URL": UNREACHABLE})
    assert code == 2
    assert _one_line(err) == (
        f"sluicegate: cannot listen on the gRPC address 127.0.0.1:{first.port}:"
        " the port is taken (is another instance running?)"
    )


@pytest.mark.parametrize(
    ("listen", "complaint"),
    [
        ("garbage", "is not host:port"),
        ("127.0.0.1:99999", "has no port between 0 and 65535"),
        ("no-such-host.invalid:50051", "does not resolve"),
        ("10.255.255.1:50051", "not an address of this machine"),
        ("::1:50051", "in brackets"),
    ],
)
async def test_a_bad_listen_address_is_one_line_before_connecting(listen: str, complaint: str) -> None:
    code, _, err = await run_cli("dispatcher", "--listen", listen, env={"RABBITMQ_URL": UNREACHABLE})
    assert code == 2
    assert complaint in _one_line(err)


@pytest.mark.parametrize("role", ["scheduler", "dispatcher", "worker"])
async def test_a_taken_metrics_port_is_one_line_before_connecting(role: str, taken_port: int) -> None:
    env = {
        "RABBITMQ_URL": UNREACHABLE,
        "SLUICEGATE_METRICS_PORT": str(taken_port),
        "SLUICEGATE_METRICS_HOST": "127.0.0.1",
    }
    code, _, err = await run_cli(role, "--prefix", "t-metrics", env=env)
    assert code == 2
    assert f"cannot listen on the metrics port 127.0.0.1:{taken_port}: the port is taken" in _one_line(err)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SLUICEGATE_METRICS_PORT": "http"}, "SLUICEGATE_METRICS_PORT"),
        ({"SLUICEGATE_METRICS_PORT": "70000"}, "SLUICEGATE_METRICS_PORT"),
        ({"RABBITMQ_URL": "amqp://guest:x@127.0.0.1:notaport/"}, "RABBITMQ_URL"),
        ({"RABBITMQ_URL": "http://127.0.0.1:5672/"}, "RABBITMQ_URL"),
        ({"RABBITMQ_URL": "garbage"}, "RABBITMQ_URL"),
    ],
)
async def test_malformed_settings_are_one_line_and_exit_2(env: dict[str, str], named: str) -> None:
    code, _, err = await run_cli("scheduler", env={"RABBITMQ_URL": UNREACHABLE, **env})
    assert code == 2
    assert named in _one_line(err)


async def test_a_clean_close_warns_nothing_and_a_clean_worker_shutdown_is_info(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = await stack.start_worker(dispatcher, "w-clean")
    await stack.wait_workers_known(1)
    client = await stack.client()
    await client.result(await client.submit("echo", b"x"), timeout=20)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        await client.close()
        await worker.stop()
        await eventually(lambda: not list(dispatcher.sessions), timeout=10)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], [r.getMessage() for r in warnings]
    left = [r.getMessage() for r in caplog.records if r.name == "sluicegate_dispatcher.housekeeping"]
    assert left == ["worker w-clean left (shut down); requeueing 0 leases"]
    assert "worker w-clean stopped" in [r.getMessage() for r in caplog.records if r.name == "sluicegate.worker"]


async def test_a_worker_says_once_where_it_registered(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = await stack.start_dispatcher()
    with caplog.at_level(logging.INFO, logger="sluicegate.worker"):
        await stack.start_worker(dispatcher, "w-hello")
        await eventually(lambda: dispatcher.sessions.leases == 0, timeout=1)
    said = [r.getMessage() for r in caplog.records if r.name == "sluicegate.worker"]
    assert said == [f"worker w-hello registered with dispatcher {dispatcher.id} at 127.0.0.1:{dispatcher.port}"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "sluicegate.worker")


async def test_a_virtual_host_the_user_may_not_use_is_reported_as_such(broker: BrokerSettings) -> None:
    url = broker.rabbitmq_url.get_secret_value().rstrip("/") + "/no-such-vhost"
    started = time.monotonic()
    code, _, err = await run_cli("submit", "echo", env={"RABBITMQ_URL": url})
    assert code == 1
    assert "refused the connection: check that the virtual host exists" in _one_line(err)
    assert time.monotonic() - started < 10
