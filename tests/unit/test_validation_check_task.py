"""Unit tests of check_task: each out-of-range field raises InvalidInput whose message names that field."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sluicegate.errors import InvalidInput, PermanentError
from sluicegate.v1 import messages_pb2
from sluicegate.validation import (
    DEFAULT_MAX_PAYLOAD,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_TIMEOUT_MS,
    check_action,
    check_action_options,
    check_labels,
    check_task,
    check_tenant,
    parse_labels,
)

pytestmark = pytest.mark.timeout(5)


def valid_task(**fields: object) -> messages_pb2.Task:
    task = messages_pb2.Task(
        task_id="0f8e3c1a-3b7e-4b8e-9a51-2f1a5e7c9d10",
        tenant="acme",
        action="images.resize",
        payload=b'{"w": 64}',
        priority=7,
        timeout_ms=30_000,
        max_retries=3,
    )
    task.labels["region"] = "eu"
    for name, value in fields.items():
        setattr(task, name, value)
    return task


def rejected(task: messages_pb2.Task, **kw: int) -> str:
    with pytest.raises(InvalidInput) as info:
        check_task(task, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_invalid_input_is_permanent() -> None:
    assert issubclass(InvalidInput, PermanentError)
    assert InvalidInput("x").retryable is False


def test_a_valid_task_passes() -> None:
    check_task(valid_task())


@pytest.mark.parametrize(
    "action",
    ["a", "resize", "images.resize", "ns:do-it", "A_b.c:d-e", "a" * 128],
)
def test_valid_actions_pass(action: str) -> None:
    check_task(valid_task(action=action))


def test_empty_action() -> None:
    assert "action" in rejected(valid_task(action=""))


@pytest.mark.parametrize(
    "action",
    ["1abc", "a b", "a" * 200, "a" * 129, "_hidden", "-x", "resize!", "ré", "a/b", " resize"],
)
def test_malformed_action(action: str) -> None:
    assert "action" in rejected(valid_task(action=action))


def test_oversized_payload() -> None:
    message = rejected(valid_task(payload=b"x" * (DEFAULT_MAX_PAYLOAD + 1)))
    assert "payload" in message


def test_payload_at_the_limit_passes() -> None:
    check_task(valid_task(payload=b"x" * DEFAULT_MAX_PAYLOAD))
    check_task(valid_task(payload=b""))


def test_payload_limit_is_configurable() -> None:
    check_task(valid_task(payload=b"x" * 10), max_payload=10)
    assert "payload" in rejected(valid_task(payload=b"x" * 11), max_payload=10)


@pytest.mark.parametrize("priority", [-1, MAX_PRIORITY + 1, -(2**31), 2**31 - 1])
def test_priority_out_of_range(priority: int) -> None:
    assert "priority" in rejected(valid_task(priority=priority))


@pytest.mark.parametrize("priority", [0, 1, MAX_PRIORITY])
def test_priority_in_range(priority: int) -> None:
    check_task(valid_task(priority=priority))


@pytest.mark.parametrize("tenant", ["", "a b", "-acme", "x" * 65, "acme/prod", "ünï"])
def test_bad_tenant(tenant: str) -> None:
    assert "tenant" in rejected(valid_task(tenant=tenant))


@pytest.mark.parametrize("tenant", ["a", "acme", "Acme-Prod_1.eu", "x" * 64])
def test_good_tenant(tenant: str) -> None:
    check_task(valid_task(tenant=tenant))


def test_too_many_labels() -> None:
    task = valid_task()
    task.labels.clear()
    for i in range(MAX_LABELS + 1):
        task.labels[f"k{i}"] = "v"
    assert "label" in rejected(task)


def test_labels_up_to_the_limit_pass() -> None:
    task = valid_task()
    task.labels.clear()
    for i in range(MAX_LABELS):
        task.labels[f"k{i}"] = "v"
    check_task(task)


@pytest.mark.parametrize("key", ["", "a b", "-x", "k" * 64, "ключ"])
def test_bad_label_key(key: str) -> None:
    task = valid_task()
    task.labels[key] = "v"
    assert "label" in rejected(task)


def test_label_value_too_long() -> None:
    task = valid_task()
    task.labels["gpu"] = "x" * (MAX_LABEL_VALUE + 1)
    message = rejected(task)
    assert "label" in message
    assert "gpu" in message


@pytest.mark.parametrize("task_id", ["", "a b", "-abc", "x" * 129, "id/with/slash", "ü"])
def test_bad_task_id(task_id: str) -> None:
    assert "task_id" in rejected(valid_task(task_id=task_id))


@pytest.mark.parametrize("task_id", ["a", "x" * 128, "job:42.attempt_1-b"])
def test_good_task_id(task_id: str) -> None:
    check_task(valid_task(task_id=task_id))


@pytest.mark.parametrize(
    ("field", "value"),
    [("action", "resize\n"), ("tenant", "acme\n"), ("task_id", "job-1\n")],
)
def test_trailing_newline_is_rejected(field: str, value: str) -> None:
    assert field in rejected(valid_task(**{field: value}))


def test_label_key_with_trailing_newline_is_rejected() -> None:
    task = valid_task()
    task.labels["region\n"] = "eu"
    assert "label" in rejected(task)


def test_too_many_retries() -> None:
    assert "max_retries" in rejected(valid_task(max_retries=MAX_RETRIES + 1))
    check_task(valid_task(max_retries=MAX_RETRIES))


def test_timeout_too_long() -> None:
    assert "timeout" in rejected(valid_task(timeout_ms=MAX_TIMEOUT_MS + 1))
    check_task(valid_task(timeout_ms=MAX_TIMEOUT_MS))
    check_task(valid_task(timeout_ms=0))


@pytest.mark.parametrize(
    ("check", "value", "field"),
    [
        (check_action, "", "action"),
        (check_action, "9lives", "action"),
        (check_tenant, "", "tenant"),
        (check_labels, {"bad key": "v"}, "label"),
    ],
)
def test_single_checks(check: Callable[[object], None], value: object, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        check(value)


def test_check_labels_accepts_a_plain_dict() -> None:
    check_labels({"region": "eu", "team/owner": "media"})
    check_labels({})


# Backoff, per-action defaults, labels written as text.


@pytest.mark.parametrize(
    ("backoff", "words"),
    [
        (messages_pb2.Backoff(initial_ms=24 * 3600 * 1000 + 1, max_ms=24 * 3600 * 1000 + 1), "initial"),
        (messages_pb2.Backoff(initial_ms=0, max_ms=24 * 3600 * 1000 + 1), "max"),
        (messages_pb2.Backoff(initial_ms=2000, max_ms=1000), "max wait must not be shorter"),
        (messages_pb2.Backoff(max_ms=1000, multiplier=0.99), "multiplier"),
        (messages_pb2.Backoff(max_ms=1000, multiplier=10.01), "multiplier"),
        (messages_pb2.Backoff(max_ms=1000, multiplier=-2), "multiplier"),
        (messages_pb2.Backoff(max_ms=1000, multiplier=float("inf")), "multiplier"),
        (messages_pb2.Backoff(max_ms=1000, multiplier=float("nan")), "multiplier"),
    ],
)
def test_backoff_out_of_range(backoff: messages_pb2.Backoff, words: str) -> None:
    task = valid_task()
    task.backoff.CopyFrom(backoff)
    assert words in rejected(task)


@pytest.mark.parametrize(
    "backoff",
    [
        messages_pb2.Backoff(),  # set and empty: retry at once
        messages_pb2.Backoff(initial_ms=500, max_ms=30_000),  # multiplier 0 means 2
        messages_pb2.Backoff(initial_ms=24 * 3600 * 1000, max_ms=24 * 3600 * 1000, multiplier=10, no_jitter=True),
        messages_pb2.Backoff(initial_ms=1, max_ms=1, multiplier=1),
    ],
)
def test_backoff_in_range_passes(backoff: messages_pb2.Backoff) -> None:
    task = valid_task()
    task.backoff.CopyFrom(backoff)
    check_task(task)


def test_action_options_are_checked_like_a_tasks_own() -> None:
    check_action_options("resize", messages_pb2.ActionOptions())
    check_action_options("resize", messages_pb2.ActionOptions(max_retries=MAX_RETRIES))
    with pytest.raises(InvalidInput, match="max_retries of action 'resize'"):
        check_action_options("resize", messages_pb2.ActionOptions(max_retries=MAX_RETRIES + 1))
    bad = messages_pb2.ActionOptions(backoff=messages_pb2.Backoff(max_ms=10, multiplier=20))
    with pytest.raises(InvalidInput, match="action 'resize': backoff multiplier") as info:
        check_action_options("resize", bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("", {}),
        ("gpu=a100", {"gpu": "a100"}),
        ("gpu=a100,zone=eu-1", {"gpu": "a100", "zone": "eu-1"}),
        (" gpu = a100 , zone=eu ,", {"gpu": "a100", "zone": "eu"}),
        ("empty=", {"empty": ""}),
        ("url=a=b", {"url": "a=b"}),
    ],
)
def test_labels_written_as_text(text: str, labels: dict[str, str]) -> None:
    assert parse_labels(text) == labels


def test_labels_given_as_repeated_flags_may_hold_commas() -> None:
    assert parse_labels(["zones=eu,us", "gpu=1"]) == {"zones": "eu,us", "gpu": "1"}


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("gpu", "key=value"),
        ("=a100", "key=value"),
        ("gpu=1,gpu=2", "twice"),
        ("bad key=1", "label key"),
        ([""], "key=value"),
        (",".join(f"k{i}=v" for i in range(MAX_LABELS + 1)), "labels"),
    ],
)
def test_bad_labels_are_refused_in_one_line(given: str | list[str], words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as info:
        parse_labels(given)
    assert "\n" not in str(info.value)
