"""The image's health check against real processes started the way the image starts them."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import Stack

HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _check(port: int, path: str = "/healthz") -> int:
    # An empty process table: this machine's may hold a one-shot `sluicegate` command of another
    # test, which the check (made for a container's own processes) would take as nothing to probe.
    empty = tempfile.mkdtemp()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK), path,
        env={**os.environ, "SLUICEGATE_METRICS_PORT": str(port), "SLUICEGATE_HEALTHCHECK_PROC": empty},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), 10)


@pytest.mark.parametrize("role", ["scheduler", "dispatcher"])
async def test_health_check_passes_on_a_running_service_and_fails_once_it_stopped(stack: Stack, role: str) -> None:
    port = _free_port()
    args = ["dispatcher", "--listen", f"127.0.0.1:{_free_port()}"] if role == "dispatcher" else ["scheduler"]
    env = {
        **os.environ,
        "RABBITMQ_URL": stack.broker.rabbitmq_url.get_secret_value(),
        "SLUICEGATE_PREFIX": stack.broker.prefix,
        "SLUICEGATE_METRICS_PORT": str(port),
        "SLUICEGATE_METRICS_HOST": "127.0.0.1",
        "SLUICEGATE_DISPATCHER_ID": "health",
        "SLUICEGATE_DISPATCHER_DRAIN_GRACE": "100ms",
    }
    stack.dispatchers_ids.append("health")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "sluicegate", *args, env=env)
    try:
        for _ in range(200):
            if await _check(port, "/readyz") == 0:
                break
            await asyncio.sleep(0.05)
        assert await _check(port) == 0
        assert await _check(port, "/readyz") == 0
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 15) == 0, "SIGTERM is a clean stop"
        assert await _check(port) == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
