"""A task waiting to be placed, as the scheduler's core sees it, and its parked form on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sluicegate.v1 import messages_pb2


class Origin(StrEnum):
    """Where an item was consumed from; it decides what waiting means for it."""

    INTAKE = "intake"  # submitted: placed at once, or parked
    DUE = "due"  # back from a delay: placed at once, or parked
    REQUEUE = "requeue"  # an attempt came back: placed ahead of its lane, or parked
    LANE = "lane"  # taken from its lane: waits in memory for a worker
    TIMER = "timer"  # held in memory for the last stretch of a delay


@dataclass(slots=True, eq=False)
class Pending:
    """A task waiting for a worker, with what its earlier attempts left behind.

    `source` is the shell's handle to the delivery that carries it; the item counts against that
    delivery until its fate (placed, parked, delayed, buried) is confirmed.
    """

    task: messages_pb2.Task
    source: Any
    origin: Origin
    attempt: int = 1
    dispatch_failures: int = 0
    run_failures: int = 0
    history: list[messages_pb2.Requeue] = field(default_factory=list)
    avoid: frozenset[str] = frozenset()
    trace: dict[str, str] = field(default_factory=dict)
    not_before_ms: int = 0
    size: int = 0  # bytes of the task on the wire: memory is bounded by bytes
    holder: Any = None  # the lane holding it in memory, if any
    hold_until: float = 0.0  # a requeued item held ahead of its lane is parked after this
    home: str = ""  # the worker an unconfirmed publish of this attempt went to: it goes there again

    @property
    def key(self) -> tuple[str, int]:
        """(task id, attempt it will run as): what a second copy of this item is recognised by."""
        return (self.task.task_id, self.attempt)

    @property
    def deadline_ms(self) -> int:
        """When it must have started (unix ms), or 0."""
        t = self.task
        return t.submitted_at_ms + t.schedule_timeout_ms if t.schedule_timeout_ms and t.submitted_at_ms else 0


def to_parked(item: Pending, now_ms: int) -> messages_pb2.Parked:
    return messages_pb2.Parked(
        task=item.task,
        attempt=item.attempt,
        dispatch_failures=item.dispatch_failures,
        run_failures=item.run_failures,
        history=item.history,
        avoid=sorted(item.avoid),
        trace=item.trace,
        not_before_ms=item.not_before_ms,
        parked_at_ms=now_ms,
    )


def from_parked(parked: messages_pb2.Parked, source: Any, origin: Origin) -> Pending:
    return Pending(
        task=parked.task,
        source=source,
        origin=origin,
        attempt=max(1, parked.attempt),
        dispatch_failures=parked.dispatch_failures,
        run_failures=parked.run_failures,
        history=list(parked.history),
        avoid=frozenset(parked.avoid),
        trace=dict(parked.trace) or dict(parked.task.trace),
        not_before_ms=parked.not_before_ms,
        size=parked.ByteSize(),
    )
