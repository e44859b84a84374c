"""A producer in a process of its own: submits COUNT tasks of TENANT, one per message, as fast as it can.

Run by the integration tests (the broker and prefix come from RABBITMQ_URL and SLUICEGATE_PREFIX);
prints the seconds the submission took. Being another process, it floods the intake faster than
the scheduler under test (in the test's process) reads it, as a real producer elsewhere would.
"""

from __future__ import annotations

import asyncio
import sys
import time

from sluicegate.client import Client, TaskSpec


async def main(count: int, tenant: str, action: str, fairness_key: str) -> None:
    async with Client() as client:
        started = time.monotonic()
        specs = [TaskSpec(action, b"flood", tenant=tenant, fairness_key=fairness_key) for _ in range(count)]
        for start in range(0, count, 1000):  # a thousand in flight at a time keeps the client's memory flat
            await client.submit_many(specs[start : start + 1000], batch_size=1)
        print(f"{time.monotonic() - started:.2f}", flush=True)


if __name__ == "__main__":
    count, tenant, action = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    asyncio.run(main(count, tenant, action, sys.argv[4] if len(sys.argv) > 4 else ""))
