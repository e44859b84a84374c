"""`make demo` works where no broker answers: it starts a throw-away one, says so, and removes it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.chaos.broker import available

from .conftest import _docker_client

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"
DEMO = ("--tasks", "60", "--rate", "200", "--workers", "2")


async def _run(url: str, **extra: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SLUICEGATE_RABBITMQ_URL"} | extra
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *DEMO,
        env={**env, "RABBITMQ_URL": url, "SLUICEGATE_LOG_LEVEL": "ERROR"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 160)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not available() and _docker_client() is None, reason="neither rabbitmq-server nor Docker here")
async def test_demo_without_a_broker_starts_a_throwaway_one() -> None:
    # Where rabbitmq-server is installed, the private node (no Docker engine to try an image pull on,
    # which with no registry reachable may take the whole timeout).
    extra = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"} if available() else {}
    code, out, err = await _run("amqp://guest:guest@127.0.0.1:1/", **extra)
    assert code == 0, err[-2000:]
    assert "sluicegate demo: no broker answers at 127.0.0.1:1" in err
    assert "sluicegate demo: started" in err
    assert "lost               0" in out
    assert "completed          " in out


async def test_demo_uses_a_broker_that_answers(rabbitmq_url: str) -> None:
    code, out, err = await _run(rabbitmq_url)
    assert code == 0, err[-2000:]
    assert "no broker answers" not in err
    assert "lost               0" in out
