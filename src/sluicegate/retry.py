"""Retry policies: how often a failed task runs again, and how long it waits first (pure, no I/O).

A task's own settings win field by field; where it has none, the worker's default for the action
applies; where neither says anything, a task is not retried and waits with the default backoff:

    max_retries   Task.max_retries (if set)  >  ActionOptions.max_retries (if set)  >  0
    backoff       Task.backoff (if set)      >  ActionOptions.backoff (if set)      >  DEFAULT

The wait before the n-th retry (n = failures so far, counting the one just reported) is drawn
from [0, min(max, initial * multiplier ** (n - 1))] with full jitter, or is exactly that bound
without jitter. Durations here are seconds; on the wire they are whole milliseconds.

The dispatcher stamps the effective policy into the task of every retry it sends back, so that
whoever schedules the rerun needs no worker's defaults: it waits
`backoff_delay(effective_policy(task, None), run_failures, rng)`, where `run_failures` counts the
failure just reported.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta

from sluicegate.errors import InvalidInput
from sluicegate.v1 import messages_pb2
from sluicegate.validation import MAX_RETRIES, check_action_options, check_backoff_values

DEFAULT_MULTIPLIER = 2.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The effective retry policy of one task.

    max_retries: reruns after retryable handler failures (0: none).
    initial: upper bound of the first wait, seconds.
    max: cap of every wait, seconds.
    multiplier: growth of the bound per failure (at least 1).
    jitter: full jitter (a uniform draw below the bound) when true, the bound itself when false.
    """

    max_retries: int = 0
    initial: float = 0.5
    max: float = 30.0
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: bool = True


DEFAULT = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Backoff:
    """A backoff as a producer or a worker writes it: seconds (or timedeltas), not milliseconds."""

    initial: float | timedelta = DEFAULT.initial
    max: float | timedelta = DEFAULT.max
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: bool = True

    def __post_init__(self) -> None:
        waits = [w.total_seconds() if isinstance(w, timedelta) else w for w in (self.initial, self.max)]
        if not all(math.isfinite(w) for w in waits):
            raise InvalidInput("backoff waits must be finite numbers of seconds")
        check_backoff_values(_ms(self.initial), _ms(self.max), self.multiplier)

    def to_proto(self) -> messages_pb2.Backoff:
        return messages_pb2.Backoff(
            initial_ms=_ms(self.initial), max_ms=_ms(self.max), multiplier=self.multiplier, no_jitter=not self.jitter
        )


def effective_policy(task: messages_pb2.Task, action_options: messages_pb2.ActionOptions | None) -> RetryPolicy:
    """The policy that applies to `task`, given the worker's defaults for its action (None: no defaults)."""
    if task.HasField("max_retries"):
        max_retries = task.max_retries
    elif action_options is not None and action_options.HasField("max_retries"):
        max_retries = action_options.max_retries
    else:
        max_retries = DEFAULT.max_retries
    if task.HasField("backoff"):
        backoff: messages_pb2.Backoff | None = task.backoff
    elif action_options is not None and action_options.HasField("backoff"):
        backoff = action_options.backoff
    else:
        backoff = None
    if backoff is None:
        return RetryPolicy(max_retries, DEFAULT.initial, DEFAULT.max, DEFAULT.multiplier, DEFAULT.jitter)
    return RetryPolicy(
        max_retries=max_retries,
        initial=backoff.initial_ms / 1000,
        max=backoff.max_ms / 1000,
        # The wire carries a 32-bit float: 1.1 comes back as 1.10000002; round it to what was meant.
        multiplier=round(backoff.multiplier, 6) or DEFAULT_MULTIPLIER,
        jitter=not backoff.no_jitter,
    )


def stamp(task: messages_pb2.Task, policy: RetryPolicy) -> None:
    """Write `policy` into `task` (max_retries and backoff set), so that effective_policy(task, _) == policy."""
    task.max_retries = policy.max_retries
    task.backoff.CopyFrom(
        messages_pb2.Backoff(
            initial_ms=_ms(policy.initial),
            max_ms=_ms(policy.max),
            multiplier=policy.multiplier,
            no_jitter=not policy.jitter,
        )
    )


def backoff_delay(policy: RetryPolicy, failures: int, rng: random.Random) -> float:
    """Seconds to wait before running again after `failures` failures (at least 1)."""
    if failures < 1:
        raise ValueError("failures must be at least 1")
    if policy.initial <= 0:
        return 0.0
    try:
        bound = policy.initial * policy.multiplier ** (failures - 1)
    except OverflowError:  # a huge exponent: the cap applies long before
        bound = math.inf
    bound = min(policy.max, bound)
    return rng.uniform(0.0, bound) if policy.jitter else bound


def action_options(
    action: str, max_retries: int | None, backoff: Backoff | messages_pb2.Backoff | None
) -> messages_pb2.ActionOptions:
    """A worker's defaults for one action as they go on the wire, checked (InvalidInput if out of range)."""
    options = messages_pb2.ActionOptions()
    if max_retries is not None:
        if not 0 <= max_retries <= MAX_RETRIES:  # before protobuf sees it: a uint32 raises its own error
            raise InvalidInput(f"max_retries of action {action[:128]!r} must be between 0 and {MAX_RETRIES}")
        options.max_retries = max_retries
    if backoff is not None:
        options.backoff.CopyFrom(backoff.to_proto() if isinstance(backoff, Backoff) else backoff)
    check_action_options(action, options)
    return options


def _ms(seconds: float | timedelta) -> int:
    value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
    return round(value * 1000)
