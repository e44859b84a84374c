"""A robust AMQP connection that fails over between several broker addresses (the nodes of a cluster).

aio-pika's RobustConnection restores channels, QoS, declarations and consumers after a reconnect,
but only ever reconnects to the one URL it was given: with that node down, its clients get
nothing for the whole outage. `FailoverConnection` keeps everything RobustConnection does and
changes two things. First, every time a connection is lost or an attempt fails, the next attempt
goes to the next address in the list. aio-pika reports both through `_on_connection_close` (a failed
attempt calls it with the attempt's error before raising), which is where the address moves on.

Second, after a reconnect the channels are restored side by side rather than one after the other
(aio-pika's own order), so that a channel whose declarations wait on the cluster (a node that
hangs holds up metadata writes until it is back or declared down) does not hold up a
publishing channel that has nothing to declare; a failure still fails the attempt, as before.

Between attempts aio-pika pauses `reconnect_interval`. While some address has not been tried
since the last good connection the pause is short, so a lost node costs one quick hop to the
next; once every address has failed in a row, the full interval applies, as with one address.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections.abc import Sequence
from typing import Any

from aio_pika import Connection, RobustConnection
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import ChannelNotFoundEntity
from yarl import URL

log = logging.getLogger(__name__)

# The pause before trying an address not yet tried since the last good connection: short, with
# jitter so that the clients of a lost node do not all arrive at the next one in the same instant.
QUICK_RETRY = (0.05, 0.25)


def masked(url: URL) -> str:
    """An address fit for a log line: the password replaced."""
    return str(url.with_password("******")) if url.password else str(url)


def with_heartbeat(url: URL, heartbeat: int | None) -> URL:
    """The address with an AMQP heartbeat, unless it names its own (`?heartbeat=N` wins)."""
    if heartbeat is None or "heartbeat" in url.query:
        return url
    return url.update_query(heartbeat=str(heartbeat))


class FailoverConnection(RobustConnection):
    """A RobustConnection over several addresses: each reconnect attempt goes to the next one.

    Options in the query string other than the heartbeat (`?name=...`, say) are read from the
    first address the connection uses, as aio-pika reads them once.
    """

    def __init__(
        self,
        urls: Sequence[str | URL],
        *,
        start: int = 0,
        heartbeat: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("at least one broker address is needed")
        self.addresses = tuple(with_heartbeat(URL(u), heartbeat) for u in urls)
        self.index = start % len(self.addresses)
        super().__init__(self.addresses[self.index], **kwargs)
        self.base_reconnect_interval: float = self.reconnect_interval
        self.failed_in_a_row = 0
        self.failovers = 0
        self._ours: weakref.WeakSet[AbstractRobustChannel] = weakref.WeakSet()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        if not (self._close_called or self.is_closed):
            self._next_address()

    def channel(
        self, channel_number: int | None = None, publisher_confirms: bool = True, on_return_raises: bool = False
    ) -> AbstractRobustChannel:
        channel = super().channel(channel_number, publisher_confirms, on_return_raises)
        self._ours.add(channel)
        return channel

    async def _on_connected(self) -> None:
        """What RobustConnection does on connecting, with the channels restored concurrently."""
        await Connection._on_connected(self)
        transport = self.transport
        if transport is None:
            raise RuntimeError(f"no transport for {self!r}")
        pending = list(self._ours)
        try:
            while pending:
                # A queue may depend on an exchange another channel declares: retry those that
                # found something missing, as long as some channel makes progress.
                outcomes = await asyncio.gather(*(c.restore() for c in pending), return_exceptions=True)
                errors = [e for e in outcomes if isinstance(e, BaseException)]
                fatal = [e for e in errors if not isinstance(e, ChannelNotFoundEntity)]
                if fatal:
                    raise fatal[0]
                if errors and len(errors) == len(pending):
                    raise errors[0]
                pending = [c for c, e in zip(pending, outcomes, strict=True) if isinstance(e, BaseException)]
        except Exception as err:
            await self.close_callbacks(err)
            await asyncio.gather(transport.connection.close(err), return_exceptions=True)
            raise
        if self.connection_attempt:
            await self.reconnect_callbacks()
        self.connection_attempt += 1
        self.failed_in_a_row = 0
        self.reconnect_interval = self.base_reconnect_interval

    def _next_address(self) -> None:
        """Move to the next address and choose the pause before trying it."""
        lost = self.addresses[self.index]
        self.failed_in_a_row += 1
        self.index = (self.index + 1) % len(self.addresses)
        self.url = self.addresses[self.index]
        if len(self.addresses) > 1:
            self.failovers += 1
            # aio-pika logs every failed attempt itself; say once that a live connection moves on.
            level = logging.WARNING if self.failed_in_a_row == 1 and self.connection_attempt else logging.DEBUG
            log.log(
                level, "broker connection to %s closed or refused; next attempt: %s", masked(lost), masked(self.url)
            )
        if self.failed_in_a_row % len(self.addresses) == 0:
            self.reconnect_interval = self.base_reconnect_interval
        else:
            self.reconnect_interval = random.uniform(*QUICK_RETRY)
