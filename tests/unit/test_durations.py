"""Unit tests of duration parsing (`250ms`, `2s`, `1.5m`) and the pydantic duration types."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from sluicegate.durations import Duration, LongDuration, PositiveDuration, parse_duration

pytestmark = pytest.mark.timeout(5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("2s", timedelta(seconds=2)),
        ("1.5m", timedelta(seconds=90)),
        ("1h", timedelta(hours=1)),
        ("100us", timedelta(microseconds=100)),
        ("100µs", timedelta(microseconds=100)),
        ("3", timedelta(seconds=3)),
        ("0.25", timedelta(milliseconds=250)),
        ("1.1ms", timedelta(microseconds=1100)),
        ("0s", timedelta(0)),
        (" 2 s ", timedelta(seconds=2)),
        ("10m", timedelta(minutes=10)),
    ],
)
def test_parses_text(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2, timedelta(seconds=2)),
        (0.25, timedelta(milliseconds=250)),
        (0, timedelta(0)),
    ],
)
def test_parses_numbers_as_seconds(value: float, expected: timedelta) -> None:
    assert parse_duration(value) == expected


def test_timedelta_passes_through() -> None:
    value = timedelta(milliseconds=7)
    assert parse_duration(value) is value


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "-1s",
        "",
        "   ",
        "1x",
        "s",
        "ms",
        "1.s",
        ".5s",
        "1 2s",
        "1e3s",
        "1s2",
        "inf",
        "nan",
        True,
        False,
        None,
        [1],
        b"1s",
    ],
)
def test_rejects_what_is_not_a_duration(value: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_rejection_message_does_not_echo_the_value() -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration("hunter2")
    assert "hunter2" not in str(info.value)


def test_duration_type_validates_through_pydantic() -> None:
    adapter = TypeAdapter(Duration)
    assert adapter.validate_python("250ms") == timedelta(milliseconds=250)
    assert adapter.validate_python(timedelta(0)) == timedelta(0)
    with pytest.raises(ValidationError):
        adapter.validate_python("soon")


def test_positive_duration_rejects_zero_and_negative() -> None:
    adapter = TypeAdapter(PositiveDuration)
    assert adapter.validate_python("1ms") == timedelta(milliseconds=1)
    for bad in ["0s", 0, -1, timedelta(seconds=-1), timedelta(0)]:
        with pytest.raises(ValidationError, match="longer than zero"):
            adapter.validate_python(bad)


@pytest.mark.parametrize("value", ["99999999999h", float("inf"), 1e20])
def test_out_of_range_duration_is_a_value_error(value: Any) -> None:
    # A ValueError (not OverflowError) is what pydantic turns into a validation error.
    with pytest.raises(ValueError):  # noqa: PT011
        parse_duration(value)


def test_thirty_days_is_the_longest_duration() -> None:
    assert parse_duration("720h") == timedelta(days=30)
    with pytest.raises(ValueError, match="out of range"):
        parse_duration("721h")
    with pytest.raises(ValueError, match="out of range"):
        parse_duration(-(31 * 24 * 3600))


def test_days_are_a_unit() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("1.5d") == timedelta(hours=36)


def test_long_durations_reach_ten_years() -> None:
    adapter = TypeAdapter(LongDuration)
    assert adapter.validate_python("90d") == timedelta(days=90)
    assert adapter.validate_python("3650d") == timedelta(days=3650)
    with pytest.raises(ValidationError, match="out of range"):
        adapter.validate_python("3651d")
    with pytest.raises(ValidationError, match="longer than zero"):
        adapter.validate_python("0d")
    with pytest.raises(ValueError, match="out of range"):
        parse_duration("31d")
