"""A private, throw-away RabbitMQ node for destructive faults, beside (never instead of) the shared one.

It has its own node name, ports, data and log directories, config, enabled-plugins file and HOME
(hence its own Erlang cookie), so `rabbitmqctl -n NODE ...` can only ever reach this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

from .harness import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def available() -> bool:
    return Path(SERVER).exists() and Path(CTL).exists()


class PrivateBroker:
    def __init__(self) -> None:
        self.node = f"sg-chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="sg-chaos-broker-"))
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        b = self.base
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(b / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(b / "mnesia"),
            RABBITMQ_LOG_BASE=str(b / "log"),
            RABBITMQ_CONFIG_FILE=str(b / "rabbitmq"),  # .conf is appended
            RABBITMQ_ENABLED_PLUGINS_FILE=str(b / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(b / "rabbitmq-env.conf"),  # not /etc/rabbitmq's, which names the shared node
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    async def start(self, timeout: float = 60) -> None:
        b = self.base
        for d in ("home", "mnesia", "log"):
            (b / d).mkdir(mode=0o700)
        (b / "enabled_plugins").write_text("[].\n")  # no management plugin
        (b / "rabbitmq-env.conf").write_text("")
        (b / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        out = (b / "server.out").open("wb")
        self.process = await asyncio.create_subprocess_exec(
            SERVER, env=self._env(), stdout=out, stderr=out, start_new_session=True
        )
        out.close()
        await self.wait_port(timeout)
        await self.ctl("await_startup", timeout=timeout)

    async def wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.returncode is not None:
                raise RuntimeError(f"private broker exited:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"private broker not listening on {self.port} within {timeout}s")

    async def ctl(self, *args: str, timeout: float = 30) -> str:
        """`rabbitmqctl -n NODE ...` against this node only."""
        process = await asyncio.create_subprocess_exec(
            CTL, "-n", self.node, "-q", *args,
            env=self._env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.decode(errors='replace')[-500:]}")
        return out.decode(errors="replace")

    async def close_all_connections(self) -> None:
        await self.ctl("close_all_connections", "chaos: connection killed")

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app", timeout=60)

    async def close(self) -> None:
        """Shut the node down and remove every file it had."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.ctl("shutdown", timeout=30)
            if self.process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 10)
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)  # our own session only
                await self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in [self.base / "server.out", *sorted((self.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                text += f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text
