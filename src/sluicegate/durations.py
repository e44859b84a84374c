"""Durations written as `250ms`, `2s`, `1.5m`: parsing and the pydantic type that uses it."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d)?\s*")
_LONGEST = 30 * 24 * 3600.0
_LONGEST_RETENTION = 10 * 365 * 24 * 3600.0


def parse_duration(value: Any, *, longest: float = _LONGEST) -> timedelta:
    """Turn `250ms`, `2s`, `1.5m`, `7d`, a number of seconds or a timedelta into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _PATTERN.fullmatch(value)):
        number, unit = match.groups()
        seconds = float(number) * _UNITS[unit or "s"]
    if seconds is None:
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if not math.isfinite(seconds) or abs(seconds) > longest:
        raise ValueError(f"duration is out of range (at most {round(longest / 86400)} days)")
    return timedelta(seconds=seconds)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    return value


def parse_long_duration(value: Any) -> timedelta:
    """A duration of up to ten years, for how long records are kept and how far back to look."""
    return parse_duration(value, longest=_LONGEST_RETENTION)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
LongDuration = Annotated[timedelta, BeforeValidator(parse_long_duration), AfterValidator(_positive)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
