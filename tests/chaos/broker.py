"""Private, throw-away RabbitMQ nodes for destructive faults, beside (never instead of) the shared one.

A `PrivateBroker` has its own node name, ports, data and log directories, config, enabled-plugins
file and HOME (hence its own Erlang cookie), so `rabbitmqctl -n NODE ...` can only ever reach this
node. A `PrivateCluster` starts several of them with one shared cookie and joins them; its node
names and cookie are its own, so the shared broker (`rabbit@localhost`) can never join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
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
QUEUES = "/usr/lib/rabbitmq/bin/rabbitmq-queues"


def available() -> bool:
    return Path(SERVER).exists() and Path(CTL).exists()


class PrivateBroker:
    """One node, started as its own process group so that it can be killed, frozen and restarted."""

    def __init__(
        self, node: str | None = None, *, cookie: str | None = None, base: Path | None = None, conf: str = ""
    ) -> None:
        self.node = node or f"sg-chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.conf = conf
        self.port = free_port()
        self.dist_port = free_port()
        self.cookie = cookie
        self.base = base or Path(tempfile.mkdtemp(prefix="sg-chaos-broker-"))
        self.process: asyncio.subprocess.Process | None = None
        self.paused = False
        self._prepared = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

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

    def _prepare(self) -> None:
        """Write the node's files once: a restart reuses them (and its data), as a rebooted machine would."""
        if self._prepared:
            return
        b = self.base
        for d in ("home", "mnesia", "log"):
            (b / d).mkdir(mode=0o700, exist_ok=True)
        if self.cookie is not None:  # nodes of one cluster must share it; Erlang refuses a cookie others can read
            cookie = b / "home" / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        (b / "enabled_plugins").write_text("[].\n")  # no management plugin
        (b / "rabbitmq-env.conf").write_text("")
        (b / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n" + self.conf
        )
        self._prepared = True

    async def start(self, timeout: float = 60) -> None:
        """Start the node (again, after `kill`: same name, ports and data) and wait until it serves."""
        self._prepare()
        with (self.base / "server.out").open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                SERVER, env=self._env(), stdout=out, stderr=out, start_new_session=True
            )
        self.paused = False
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

    async def ctl(self, *args: str, timeout: float = 30, tool: str = CTL) -> str:
        """`rabbitmqctl -n NODE ...` (or another CLI tool) against this node only."""
        process = await asyncio.create_subprocess_exec(
            tool, "-n", self.node, "-q", *args,
            env=self._env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"{Path(tool).name} {' '.join(args)} failed: {out.decode(errors='replace')[-500:]}")
        return out.decode(errors="replace")

    async def close_all_connections(self) -> None:
        await self.ctl("close_all_connections", "chaos: connection killed")

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app", timeout=60)

    def _signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)  # our own session only: the script and its Erlang VM

    async def kill(self) -> None:
        """SIGKILL the node, as a machine that loses power would; `start()` brings it back."""
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the node: its peers and clients see a node that is there but answers nothing."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    async def shutdown(self, timeout: float = 60) -> None:
        """Stop the node gracefully (what a rolling restart does); `start()` brings it back."""
        if not self.running:
            return
        self.resume()
        with contextlib.suppress(Exception):
            await self.ctl("shutdown", timeout=timeout)
        assert self.process is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 10)
        if self.running:
            await self.kill()

    async def close(self, *, remove: bool = True) -> None:
        """Shut the node down and (unless told not to) remove every file it had."""
        await self.shutdown(timeout=30)
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in [self.base / "server.out", *sorted((self.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                text += f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


class PrivateCluster:
    """`size` private nodes on loopback sharing one Erlang cookie, joined into one cluster."""

    def __init__(self, size: int = 3) -> None:
        tag = uuid.uuid4().hex[:6]
        self.base = Path(tempfile.mkdtemp(prefix="sg-chaos-cluster-"))
        cookie = secrets.token_hex(16).upper()
        # As deploy/rabbitmq/cluster.conf has it (the nodes are joined by hand here, not discovered).
        conf = "cluster_partition_handling = pause_minority\n"
        self.nodes = [
            PrivateBroker(f"sg-c{tag}-n{i + 1}@localhost", cookie=cookie, base=self.base / f"n{i + 1}", conf=conf)
            for i in range(size)
        ]
        for node in self.nodes:
            node.base.mkdir(mode=0o700)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's address, comma-separated, as RABBITMQ_URL takes them."""
        return ",".join(self.urls)

    async def start(self, timeout: float = 120) -> None:
        """Start every node at once, then join the others to the first, one at a time."""
        await asyncio.gather(*(node.start(timeout) for node in self.nodes))
        first = self.nodes[0].node
        for node in self.nodes[1:]:
            await node.stop_app()
            await node.ctl("reset")
            await node.ctl("join_cluster", first, timeout=60)
            await node.start_app()
        await self.wait_members(len(self.nodes), timeout)

    async def running_members(self, via: PrivateBroker | None = None) -> set[str]:
        """Names of the running nodes of the cluster, as a node that is up sees them."""
        node = via or next(n for n in self.nodes if n.running and not n.paused)
        out = await node.ctl("cluster_status", "--formatter", "json")
        return set(json.loads(out).get("running_nodes", []))

    async def wait_members(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError, TimeoutError, StopIteration):
                if len(await self.running_members()) >= count:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} running nodes within {timeout}s")
            await asyncio.sleep(0.5)

    def by_name(self, name: str) -> PrivateBroker:
        return next(node for node in self.nodes if node.node == name)

    async def leaders(self, prefix: str) -> dict[str, str]:
        """Queue name -> node holding its leader, for the quorum queues under `prefix`."""
        node = next(n for n in self.nodes if n.running and not n.paused)
        out = await node.ctl("list_queues", "name", "type", "leader", "--no-table-headers")
        leaders = {}
        for line in out.splitlines():
            fields = re.split(r"\s+", line.strip())
            if len(fields) == 3 and fields[0].startswith(prefix) and fields[1] == "quorum":
                leaders[fields[0]] = fields[2]
        return leaders

    async def members(self, queue: str) -> set[str]:
        """The nodes a quorum queue has a replica on."""
        node = next(n for n in self.nodes if n.running and not n.paused)
        out = await node.ctl("list_queues", "name", "members", "--no-table-headers")
        for line in out.splitlines():
            name, _, rest = line.strip().partition("\t")
            if name == queue:
                return set(re.findall(r"[\w.-]+@[\w.-]+", rest))
        raise KeyError(queue)

    async def describe(self, prefix: str) -> str:
        """The scenario's queues and consumers as the cluster sees them: what to print when a scenario fails."""
        node = next(n for n in self.nodes if n.running and not n.paused)
        queues = await node.ctl(
            "list_queues", "name", "type", "messages_ready", "messages_unacknowledged", "consumers",
            "leader", "online", "state",
        )  # fmt: skip
        consumers = await node.ctl(
            "list_consumers", "queue_name", "channel_pid", "prefetch_count", "active", "activity_status"
        )
        lines = [
            line for line in (queues + consumers).splitlines() if prefix in line or line.startswith(("name", "queue"))
        ]
        return "\n".join(lines)

    async def close(self) -> None:
        """Stop every node (in parallel; a frozen one is resumed first) and remove the cluster's files."""
        await asyncio.gather(*(node.close(remove=False) for node in self.nodes))
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        return "".join(f"=== {node.node}\n{node.log_tail(lines)}" for node in self.nodes)
