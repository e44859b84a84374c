"""Group commit: items for one destination go out together, with one publish in flight per destination.

Whatever is put while a publish is on its way goes out in the next one; nothing waits for a timer,
so a lone item is published at once and under load batches grow by themselves. Each `put`
returns once the publish that carried its item returned (or raises what that publish raised), so
a caller settles exactly what the broker confirmed and never earlier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(
        self,
        publish: Callable[[str, list[T]], Awaitable[None]],
        *,
        max_items: int = 500,
        max_bytes: int = 1024 * 1024,
        size: Callable[[T], int] = lambda _item: 0,
    ) -> None:
        self._publish = publish
        self.max_items, self.max_bytes, self._size = max_items, max_bytes, size
        self._pending: dict[str, list[tuple[T, asyncio.Future[None]]]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self.batches = 0
        self.items = 0

    def __len__(self) -> int:
        return sum(len(p) for p in self._pending.values())

    async def put(self, destination: str, item: T) -> None:
        """Publish `item` with whatever else is going to `destination`; returns once that publish did."""
        await self.put_many(destination, [item])

    async def put_many(self, destination: str, items: list[T]) -> None:
        """Publish `items` (in as many batches as they need); returns once every one of them went out."""
        if not items:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.setdefault(destination, []).extend(zip(items, futures, strict=True))
        if destination not in self._senders:
            self._senders[destination] = asyncio.create_task(self._send(destination))
        # gather, not one await each: when a publish fails, every later future's error is retrieved too
        # (else each logs "Future exception was never retrieved").
        await asyncio.gather(*futures)

    def _take(self, destination: str) -> list[tuple[T, asyncio.Future[None]]]:
        pending = self._pending[destination]
        count, total = 0, 0
        for item, _ in pending[: self.max_items]:
            total += self._size(item)
            if count and total > self.max_bytes:
                break
            count += 1
        batch, self._pending[destination] = pending[:count], pending[count:]
        return batch

    async def _send(self, destination: str) -> None:
        try:
            while self._pending.get(destination):
                batch = self._take(destination)
                try:
                    await self._publish(destination, [item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as err:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                self.batches += 1
                self.items += len(batch)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            del self._senders[destination]
            if not self._pending.get(destination):
                self._pending.pop(destination, None)

    async def close(self) -> None:
        """Cancel what is in flight (its callers see CancelledError); idempotent."""
        senders = list(self._senders.values())
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for pending in self._pending.values():
            for _, future in pending:
                future.cancel()
        self._pending.clear()
