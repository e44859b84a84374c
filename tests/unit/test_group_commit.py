"""Unit tests of group commit: one publish in flight per destination, batches that grow under load."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from sluicegate.batching import GroupCommit

pytestmark = pytest.mark.timeout(5)


class Publisher:
    def __init__(self, fail: str = "") -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail = fail

    async def __call__(self, destination: str, items: list[int]) -> None:
        await self.release.wait()
        self.batches.append((destination, items))
        if self.fail:
            raise RuntimeError(self.fail)  # a new one each time, as a broker's refusal is


async def test_a_lone_item_goes_at_once_and_what_comes_meanwhile_goes_in_the_next_batch() -> None:
    publisher = Publisher()
    commit: GroupCommit[int] = GroupCommit(publisher)
    publisher.release.clear()
    first = asyncio.create_task(commit.put("a", 1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(commit.put("a", n)) for n in (2, 3, 4)]
    other = asyncio.create_task(commit.put("b", 9))
    await asyncio.sleep(0)
    publisher.release.set()
    await asyncio.gather(first, *later, other)
    assert sorted(publisher.batches) == [("a", [1]), ("a", [2, 3, 4]), ("b", [9])]
    assert (commit.batches, commit.items, len(commit)) == (3, 5, 0)


async def test_batches_keep_to_their_item_and_byte_limits() -> None:
    publisher = Publisher()
    commit: GroupCommit[int] = GroupCommit(publisher, max_items=3, max_bytes=10, size=lambda n: n)
    await commit.put_many("a", [1, 1, 1, 1, 6, 6])
    assert publisher.batches == [("a", [1, 1, 1]), ("a", [1, 6]), ("a", [6])]


async def test_a_failed_publish_fails_every_caller_of_its_batch_and_leaves_no_error_unretrieved() -> None:
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    publisher = Publisher(fail="no route")
    commit: GroupCommit[int] = GroupCommit(publisher)

    async def put() -> str:
        try:
            await commit.put_many("a", [1, 2, 3])
        except RuntimeError as err:
            return str(err)  # the frame, and its futures, are let go
        return "published"

    assert await put() == "no route"
    await asyncio.sleep(0.01)  # the sender has finished
    gc.collect()  # an exception never retrieved is reported when its future is collected
    await asyncio.sleep(0.01)
    assert unretrieved == []
    publisher.fail = ""
    await commit.put("a", 4)  # the destination works again
    assert publisher.batches[-1] == ("a", [4])
