"""Unit tests of sluicegate.retry: which policy applies to a task, stamping it, and the backoff waits."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from sluicegate.errors import InvalidInput
from sluicegate.retry import DEFAULT, Backoff, RetryPolicy, action_options, backoff_delay, effective_policy, stamp
from sluicegate.v1 import messages_pb2

pytestmark = pytest.mark.timeout(5)


def task(**fields: object) -> messages_pb2.Task:
    return messages_pb2.Task(task_id="t1", tenant="acme", action="resize", **fields)  # type: ignore[arg-type]


def options(**fields: object) -> messages_pb2.ActionOptions:
    return messages_pb2.ActionOptions(**fields)  # type: ignore[arg-type]


# Which policy applies.


def test_nothing_set_means_no_retry_and_the_default_backoff() -> None:
    policy = effective_policy(task(), None)
    assert policy == RetryPolicy(max_retries=0, initial=0.5, max=30.0, multiplier=2.0, jitter=True)
    assert policy == DEFAULT
    assert effective_policy(task(), options()) == DEFAULT


def test_the_workers_defaults_apply_when_the_task_sets_nothing() -> None:
    worker = options(max_retries=4, backoff=messages_pb2.Backoff(initial_ms=100, max_ms=2000, multiplier=3))
    assert effective_policy(task(), worker) == RetryPolicy(4, 0.1, 2.0, 3.0, True)


def test_the_tasks_own_settings_win_field_by_field() -> None:
    worker = options(max_retries=4, backoff=messages_pb2.Backoff(initial_ms=100, max_ms=2000, multiplier=3))
    # Only max_retries on the task: the worker's backoff still applies.
    assert effective_policy(task(max_retries=1), worker) == RetryPolicy(1, 0.1, 2.0, 3.0, True)
    # Only a backoff on the task: the worker's max_retries still applies.
    own = messages_pb2.Backoff(initial_ms=1000, max_ms=1000, no_jitter=True)
    assert effective_policy(task(backoff=own), worker) == RetryPolicy(4, 1.0, 1.0, 2.0, False)


def test_an_explicit_zero_on_the_task_is_not_the_same_as_unset() -> None:
    worker = options(max_retries=4)
    assert effective_policy(task(max_retries=0), worker).max_retries == 0
    assert effective_policy(task(), worker).max_retries == 4


def test_an_empty_backoff_that_is_set_means_no_wait() -> None:
    policy = effective_policy(task(backoff=messages_pb2.Backoff()), options(backoff=messages_pb2.Backoff(initial_ms=9)))
    assert (policy.initial, policy.max, policy.multiplier) == (0.0, 0.0, 2.0), "multiplier 0 means 2"
    assert backoff_delay(policy, 3, random.Random(1)) == 0.0


def test_a_multiplier_that_float32_cannot_hold_comes_back_as_written() -> None:
    policy = effective_policy(task(backoff=messages_pb2.Backoff(initial_ms=10, max_ms=100, multiplier=1.1)), None)
    assert policy.multiplier == 1.1


# Stamping.


@pytest.mark.parametrize(
    "policy",
    [
        DEFAULT,
        RetryPolicy(3, 0.25, 10.0, 1.5, False),
        RetryPolicy(0, 0.0, 0.0, 1.0, True),
        RetryPolicy(100, 86400, 86400, 10, True),
    ],
)
def test_stamping_writes_the_policy_so_that_it_reads_back_unchanged(policy: RetryPolicy) -> None:
    stamped = task()
    stamp(stamped, policy)
    assert stamped.HasField("max_retries")
    assert stamped.HasField("backoff")
    # Whatever the worker says afterwards, the stamped task carries its own policy.
    assert effective_policy(stamped, options(max_retries=9, backoff=messages_pb2.Backoff(initial_ms=7))) == policy


def test_stamping_replaces_what_the_task_had() -> None:
    stamped = task(max_retries=5, backoff=messages_pb2.Backoff(initial_ms=5, max_ms=5))
    stamp(stamped, RetryPolicy(2, 1.0, 4.0, 2.0, True))
    assert stamped.max_retries == 2
    assert (stamped.backoff.initial_ms, stamped.backoff.max_ms, stamped.backoff.no_jitter) == (1000, 4000, False)


# Waits.


def test_without_jitter_the_wait_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(10, initial=0.5, max=3.0, multiplier=2.0, jitter=False)
    rng = random.Random(0)
    assert [backoff_delay(policy, n, rng) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_the_multiplier_sets_the_growth() -> None:
    policy = RetryPolicy(10, initial=0.1, max=100.0, multiplier=3.0, jitter=False)
    assert backoff_delay(policy, 3, random.Random(0)) == pytest.approx(0.9)
    flat = RetryPolicy(10, initial=0.2, max=100.0, multiplier=1.0, jitter=False)
    assert backoff_delay(flat, 50, random.Random(0)) == pytest.approx(0.2)


def test_full_jitter_draws_uniformly_below_the_bound() -> None:
    policy = RetryPolicy(10, initial=1.0, max=8.0, multiplier=2.0, jitter=True)
    rng = random.Random(42)
    for failures, bound in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        waits = [backoff_delay(policy, failures, rng) for _ in range(2000)]
        assert all(0.0 <= w <= bound for w in waits)
        # Spread over the whole range, not clustered near the bound or zero.
        assert min(waits) < 0.05 * bound
        assert max(waits) > 0.95 * bound
        assert sum(waits) / len(waits) == pytest.approx(bound / 2, rel=0.08)


def test_the_same_seed_gives_the_same_waits() -> None:
    assert [backoff_delay(DEFAULT, 3, random.Random(7)) for _ in range(3)] == [
        backoff_delay(DEFAULT, 3, random.Random(7)) for _ in range(3)
    ]


def test_a_huge_number_of_failures_stays_at_the_cap() -> None:
    policy = RetryPolicy(10, initial=0.5, max=30.0, multiplier=10.0, jitter=False)
    assert backoff_delay(policy, 10_000, random.Random(0)) == 30.0
    zero = RetryPolicy(10, initial=0.0, max=30.0, multiplier=10.0, jitter=False)
    assert backoff_delay(zero, 10_000, random.Random(0)) == 0.0


@pytest.mark.parametrize("failures", [0, -1])
def test_a_wait_needs_at_least_one_failure(failures: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        backoff_delay(DEFAULT, failures, random.Random(0))


# What producers and workers write.


def test_a_backoff_in_seconds_or_timedeltas_goes_on_the_wire_in_milliseconds() -> None:
    wire = Backoff(initial=timedelta(milliseconds=250), max=60, multiplier=1.5, jitter=False).to_proto()
    assert (wire.initial_ms, wire.max_ms, wire.multiplier, wire.no_jitter) == (250, 60_000, 1.5, True)
    assert Backoff().to_proto() == messages_pb2.Backoff(initial_ms=500, max_ms=30_000, multiplier=2.0)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"initial": -1}, "initial"),
        ({"initial": 90_000, "max": 90_000}, "initial"),
        ({"max": 86_401}, "max"),
        ({"initial": 5, "max": 1}, "shorter than its initial"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": 11}, "multiplier"),
        ({"multiplier": float("nan")}, "multiplier"),
        ({"initial": float("inf")}, "finite"),
        ({"max": float("nan")}, "finite"),
    ],
)
def test_a_backoff_out_of_range_is_refused_in_one_line(fields: dict[str, float], words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as info:
        Backoff(**fields)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_action_options_carry_only_what_was_given() -> None:
    assert not action_options("resize", None, None).ListFields()
    only_retries = action_options("resize", 0, None)
    assert only_retries.HasField("max_retries")
    assert not only_retries.HasField("backoff")
    both = action_options("resize", 3, Backoff(initial=1, max=2))
    assert both.max_retries == 3
    assert both.backoff.max_ms == 2000
    raw = action_options("resize", None, messages_pb2.Backoff(initial_ms=5, max_ms=5))
    assert raw.backoff.initial_ms == 5


@pytest.mark.parametrize(
    ("max_retries", "backoff", "words"),
    [
        (-1, None, "max_retries"),
        (101, None, "max_retries"),
        (2**40, None, "max_retries"),
        (None, messages_pb2.Backoff(initial_ms=10, max_ms=1), "resize"),
    ],
)
def test_action_options_out_of_range_are_refused(
    max_retries: int | None, backoff: messages_pb2.Backoff | None, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words):
        action_options("resize", max_retries, backoff)
