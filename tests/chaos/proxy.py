"""A flaky TCP link, in the test's own event loop: it forwards bytes, and on demand cuts, stalls or slows them."""

from __future__ import annotations

import asyncio
import contextlib


class FlakyProxy:
    """Listens on 127.0.0.1:<port> and forwards every connection to `target`.

    - `cut()` resets every open connection (new ones are accepted);
    - `stall()` / `unstall()` stop and resume forwarding in both directions, connections kept open
      (a peer that is alive but silent: only keepalives or heartbeats can tell);
    - `slow(delay)` delays every chunk by `delay` seconds (latency, and with it less bandwidth).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        self.cuts = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        self._flowing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        links = list(self._links)
        for a, b in links:
            for writer in (a, b):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        self._links.clear()
        self.cuts += 1
        return len(links)

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def slow(self, delay: float) -> None:
        self.delay = delay

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for w in link:
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()  # data read just before a stall waits for its end
                writer.write(data)
                await writer.drain()
