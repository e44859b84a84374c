"""RabbitMQ in a container, for faults only a container allows: `docker pause` (a frozen broker whose
TCP stack still answers) and `docker network disconnect` (a partition: its address stops answering).

The broker runs from the locally built image (scripts/containers.py builds it from Debian's
rabbitmq-server; SLUICEGATE_CHAOS_RABBITMQ_IMAGE names another) on a network of its own, and the
in-process services reach it at its address on that network. Everything is removed at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid

IMAGE = os.environ.get("SLUICEGATE_CHAOS_RABBITMQ_IMAGE", "sluicegate-local/rabbitmq:3.10")


def unavailable() -> str | None:
    """Why the container scenarios cannot run here, or None if they can."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False).returncode != 0:
        return "no Docker engine answers (make chaos starts one)"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False).returncode != 0:
        return f"no image {IMAGE} (make chaos builds it: python scripts/containers.py images)"
    return None


async def docker(*args: str, timeout: float = 60) -> str:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)} exited {process.returncode}: {out.decode(errors='replace')[-500:]}"
        )
    return out.decode(errors="replace")


class ContainerBroker:
    def __init__(self, heartbeat_s: int = 5) -> None:
        self.name = f"sg-chaos-rmq-{uuid.uuid4().hex[:8]}"
        self.network = f"{self.name}-net"
        self.heartbeat_s = heartbeat_s
        self.ip = ""

    @property
    def url(self) -> str:
        # A short AMQP heartbeat, as a deployment that wants a hung broker noticed would set.
        return f"amqp://guest:guest@{self.ip}:5672/?heartbeat={self.heartbeat_s}"

    async def start(self, timeout: float = 90) -> None:
        await docker("network", "create", self.network)
        await docker("run", "-d", "--name", self.name, "--hostname", "rmq", "--network", self.network, IMAGE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                await docker("exec", self.name, "rabbitmq-diagnostics", "-q", "check_port_connectivity")
                break
            if loop.time() > deadline:
                raise TimeoutError(f"RabbitMQ in {self.name} not up within {timeout}s:\n{await self.logs()}")
            await asyncio.sleep(1)
        self.ip = await self._address()

    async def _address(self) -> str:
        networks = json.loads(await docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", self.name))
        return str(networks[self.network]["IPAddress"])

    async def pause(self) -> None:
        await docker("pause", self.name)

    async def unpause(self) -> None:
        await docker("unpause", self.name)

    async def disconnect(self) -> None:
        await docker("network", "disconnect", self.network, self.name)

    async def connect(self) -> None:
        # Alone on its network, it gets its address back: the clients know it by that address.
        await docker("network", "connect", self.network, self.name)
        again = await self._address()
        if again != self.ip:
            raise RuntimeError(f"{self.name} came back at {again}, not {self.ip}")

    async def logs(self, tail: int = 30) -> str:
        with contextlib.suppress(Exception):
            return await docker("logs", "--tail", str(tail), self.name)
        return ""

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await docker("unpause", self.name)
        with contextlib.suppress(Exception):
            await docker("rm", "-f", "-v", self.name)
        with contextlib.suppress(Exception):
            await docker("network", "rm", self.network)
