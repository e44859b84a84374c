"""Retry policies: how often a failed task runs again and how long it waits first (pure).

A task's own settings win; otherwise the worker's default for the action; otherwise no retry.
The wait before retry n (1 for the first) is drawn uniformly from
[0, min(max, initial * multiplier ** (n - 1))] ("full jitter"), or is exactly that bound when
jitter is off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sluicegate.v1 import messages_pb2

DEFAULT_INITIAL = 0.5
DEFAULT_MAX = 30.0
DEFAULT_MULTIPLIER = 2.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 0
    initial: float = DEFAULT_INITIAL  # seconds
    max: float = DEFAULT_MAX
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: bool = True


def _with_backoff(max_retries: int, backoff: messages_pb2.Backoff | None) -> RetryPolicy:
    if backoff is None:
        return RetryPolicy(max_retries=max_retries)
    return RetryPolicy(
        max_retries=max_retries,
        initial=backoff.initial_ms / 1000 if backoff.initial_ms else DEFAULT_INITIAL,
        max=backoff.max_ms / 1000 if backoff.max_ms else DEFAULT_MAX,
        multiplier=backoff.multiplier or DEFAULT_MULTIPLIER,
        jitter=not backoff.no_jitter,
    )


def effective_policy(task: messages_pb2.Task, options: messages_pb2.ActionOptions | None = None) -> RetryPolicy:
    """The policy a failure of `task` follows, given its worker's defaults for the action."""
    if task.HasField("max_retries"):
        retries = task.max_retries
    elif options is not None and options.HasField("max_retries"):
        retries = options.max_retries
    else:
        retries = 0
    if task.HasField("backoff"):
        backoff: messages_pb2.Backoff | None = task.backoff
    elif options is not None and options.HasField("backoff"):
        backoff = options.backoff
    else:
        backoff = None
    return _with_backoff(retries, backoff)


def stamp(task: messages_pb2.Task, policy: RetryPolicy) -> None:
    """Write `policy` into the task, so whoever handles its retry next follows the same one."""
    task.max_retries = policy.max_retries
    task.backoff.CopyFrom(
        messages_pb2.Backoff(
            initial_ms=round(policy.initial * 1000),
            max_ms=round(policy.max * 1000),
            multiplier=policy.multiplier,
            no_jitter=not policy.jitter,
        )
    )


def backoff_delay(policy: RetryPolicy, failures: int, rng: random.Random) -> float:
    """Seconds to wait before the retry that follows the `failures`-th failure."""
    bound = min(policy.max, policy.initial * policy.multiplier ** max(0, failures - 1))
    return rng.uniform(0.0, bound) if policy.jitter else bound
