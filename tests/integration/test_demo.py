"""The demo end to end: its summary, and its clean-up when it is interrupted."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aio_pika
import aiormq
import pytest

from .conftest import Stack


async def _exists(url: str, queue: str) -> bool:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def _demo(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "RABBITMQ_URL": stack.broker.rabbitmq_url.get_secret_value(), "SLUICEGATE_LOG_LEVEL": "ERROR"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluicegate", "--prefix", stack.broker.prefix, "demo", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_demo_prints_its_summary_and_loses_nothing(stack: Stack) -> None:
    demo = await _demo(stack, "--tasks", "300", "--rate", "300")
    out, err = await asyncio.wait_for(demo.communicate(), 90)
    text = out.decode()
    assert demo.returncode == 0, err.decode()[-2000:]
    assert re.search(r"^completed\s+297$", text, re.M), text
    assert re.search(r"^failed\s+3 ", text, re.M), text
    assert re.search(r"^lost\s+0$", text, re.M), text
    prefix = re.search(r" on (\S+);", text)
    assert prefix is not None
    assert not await _exists(stack.broker.rabbitmq_url.get_secret_value(), f"{prefix.group(1)}.tasks")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_an_interrupted_demo_removes_what_it_declared(stack: Stack, sig: signal.Signals) -> None:
    demo = await _demo(stack, "--tasks", "100000", "--rate", "200")
    assert demo.stdout is not None
    line = (await asyncio.wait_for(demo.stdout.readline(), 60)).decode()
    prefix = re.search(r" on (\S+);", line)
    assert prefix is not None, line
    url = stack.broker.rabbitmq_url.get_secret_value()
    assert await _exists(url, f"{prefix.group(1)}.tasks")
    demo.send_signal(sig)
    _, err = await asyncio.wait_for(demo.communicate(), 60)
    assert demo.returncode == 130
    assert "sluicegate: demo interrupted" in err.decode()
    assert not await _exists(url, f"{prefix.group(1)}.tasks")
