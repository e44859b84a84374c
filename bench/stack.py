"""A Sluicegate deployment for one benchmark scenario: scheduler, dispatcher and worker fleets, each its own process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError

from bench.fleet import worker_id
from bench.procs import Child, Processes, free_port, python_module, wait_for_port
from sluicegate import amqp
from sluicegate.settings import BrokerSettings
from sluicegate.v1 import messages_pb2


def split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal positive counts."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


class StateWatcher:
    """Follows one dispatcher's worker-state snapshots: how many workers are connected and ready."""

    def __init__(self, broker: BrokerSettings, dispatcher_id: str) -> None:
        self.broker = broker
        self.topology = amqp.Topology(broker.prefix)
        self.dispatcher_id = dispatcher_id
        self.workers = 0
        self.ready = 0
        self._changed = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await amqp.connect(self.broker.urls, deadline=10)
        channel = await self._connection.channel()
        exchanges = await amqp.Exchanges(self.topology).declare(channel)
        queue = await channel.declare_queue(
            f"{self.broker.prefix}.bench.state.{self.dispatcher_id}", durable=False, exclusive=True, auto_delete=True
        )
        await queue.bind(exchanges.events, routing_key=self.topology.state_key(self.dispatcher_id))
        await queue.consume(self._on_state, no_ack=True)

    async def _on_state(self, message: AbstractIncomingMessage) -> None:
        try:
            state = messages_pb2.DispatcherState.FromString(message.body)
        except DecodeError:
            return
        self.workers = len(state.workers)
        self.ready = sum(w.ready for w in state.workers)
        self._changed.set()

    async def wait_ready(self, count: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.ready < count:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        return True

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


class Stack:
    """Scheduler, dispatcher and worker fleets on their own prefix; `stop` and `clean` undo everything."""

    def __init__(self, procs: Processes, broker: BrokerSettings, tag: str, *, log_level: str = "WARNING") -> None:
        self.procs = procs
        self.broker = broker
        self.tag = tag
        self.log_level = log_level
        self.dispatcher_id = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.port = 0
        self.scheduler: Child | None = None
        self.dispatcher: Child | None = None
        self.fleets: list[Child] = []
        self.workers = 0
        self.stalled_ids: list[str] = []
        self.watcher: StateWatcher | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment a process needs to reach this stack's broker and prefix."""
        return {"RABBITMQ_URL": ",".join(self.broker.urls), "SLUICEGATE_PREFIX": self.broker.prefix}

    def _sluicegate(self, *args: str) -> list[str]:
        return python_module("sluicegate", "--log-level", self.log_level, "--prefix", self.broker.prefix, *args)

    async def start_dispatcher(self, *, ack_timeout: str = "5s") -> Child:
        self.port = free_port()
        argv = self._sluicegate(
            "dispatcher",
            "--id",
            self.dispatcher_id,
            "--listen",
            self.address,
            "--ack-timeout",
            ack_timeout,
            "--drain-grace",
            "500ms",
        )
        self.dispatcher = self.procs.start(f"{self.tag}-dispatcher", argv, env=self.env())
        await wait_for_port(self.dispatcher, self.port)
        self.watcher = StateWatcher(self.broker, self.dispatcher_id)
        await self.watcher.start()
        return self.dispatcher

    def start_scheduler(self, env: dict[str, str] | None = None) -> Child:
        argv = self._sluicegate("scheduler")
        self.scheduler = self.procs.start(f"{self.tag}-scheduler", argv, env=self.env() | (env or {}))
        return self.scheduler

    async def start_fleets(
        self,
        workers: int,
        fleet_procs: int,
        slots: int,
        *,
        stall_count: int = 0,
        name: str = "",
        ready_timeout: float = 120.0,
        ramp: int = 0,
    ) -> None:
        """Start `workers` workers over `fleet_procs` processes; wait until the dispatcher has every stream."""
        name = name or self.tag
        for k, count in enumerate(split(workers, fleet_procs)):
            fleet_name = f"{name}f{k}"
            stalls = min(stall_count, count) if k == 0 else 0
            argv = python_module(
                "bench.fleet",
                "--dispatchers",
                self.address,
                "--workers",
                str(count),
                "--slots",
                str(slots),
                "--name",
                fleet_name,
                "--stall-count",
                str(stalls),
                "--ready-timeout",
                str(ready_timeout),
                "--ramp",
                str(ramp),
            )
            self.fleets.append(self.procs.start(f"{self.tag}-{fleet_name}", argv, env=self.env(), stdout=True))
            self.stalled_ids += [worker_id(fleet_name, i) for i in range(stalls)]
        self.workers += workers
        for fleet in self.fleets:
            line = await fleet.read_line(ready_timeout + 10)
            if not line.startswith("ready"):
                raise RuntimeError(f"{fleet.name}: {line}\n{fleet.log_tail()}")
        assert self.watcher is not None
        if not await self.watcher.wait_ready(self.workers, 60.0):
            raise RuntimeError(f"dispatcher has {self.watcher.ready} of {self.workers} worker streams ready")

    async def stall(self) -> list[str]:
        """Make the stall-designated workers stop reading their streams."""
        if not self.stalled_ids:
            return []
        self.fleets[0].send_signal(signal.SIGUSR1)
        line = await self.fleets[0].read_line(10)
        if not line.startswith("stalled"):
            raise RuntimeError(f"fleet did not stall: {line}")
        return self.stalled_ids

    async def resume(self) -> None:
        if self.stalled_ids:
            self.fleets[0].send_signal(signal.SIGUSR2)
            await self.fleets[0].read_line(10)

    def pids(self) -> dict[str, int]:
        found = {}
        if self.scheduler is not None:
            found["scheduler"] = self.scheduler.pid
        if self.dispatcher is not None:
            found["dispatcher"] = self.dispatcher.pid
        for k, fleet in enumerate(self.fleets):
            found[f"workers{k}" if len(self.fleets) > 1 else "workers"] = fleet.pid
        return found

    def check_alive(self) -> None:
        for child in [self.scheduler, self.dispatcher, *self.fleets]:
            if child is not None and not child.alive():
                raise RuntimeError(f"{child.name} exited (code {child.popen.poll()}):\n{child.log_tail()}")

    async def stop(self) -> None:
        """Stop the fleets first (their sessions end cleanly), then the dispatcher and the scheduler."""
        if self.watcher is not None:
            await self.watcher.close()
        await self.procs.stop(self.fleets, grace=15.0)
        await self.procs.stop([c for c in (self.dispatcher, self.scheduler) if c is not None], grace=10.0)

    async def clean(self) -> None:
        """Delete every queue and exchange of this stack's prefix."""
        with contextlib.suppress(Exception):
            connection = await amqp.connect(self.broker.urls, deadline=5)
            async with connection:
                await asyncio.wait_for(
                    amqp.delete_topology(connection, amqp.Topology(self.broker.prefix), [self.dispatcher_id]), 30
                )
