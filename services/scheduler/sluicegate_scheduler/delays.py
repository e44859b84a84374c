"""The delay ladder: fixed-TTL queues a waiting task hops down until its time comes (pure).

RabbitMQ expires per-message TTLs only at the head of a queue, so mixed delays in one queue would
hold a short one behind a long one. Each rung is therefore a queue whose messages all share one
TTL; a task hops onto the longest rung that does not overshoot what is left of its wait, and when
it comes back the scheduler looks again. The last stretch, shorter than the shortest rung, is
waited in memory. A task is thus never released early, and late by at most one hop's delivery lag.
"""

from __future__ import annotations

from bisect import bisect_right

from sluicegate.amqp import DELAY_RUNGS_MS as RUNGS

MAX_DELAY_MS = 7 * 24 * 3600 * 1000


def rung_for(remaining_ms: int, hold_ms: int) -> int | None:
    """The rung to wait on for `remaining_ms`, or None when what is left is short enough to hold in memory."""
    if remaining_ms <= hold_ms or remaining_ms < RUNGS[0]:
        return None
    return RUNGS[bisect_right(RUNGS, remaining_ms) - 1]
