"""Durations written as `250ms`, `2s`, `1.5m`: parsing and the pydantic type that uses it."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*")
_LONGEST = 30 * 24 * 3600.0


def parse_duration(value: Any) -> timedelta:
    """Turn `250ms`, `2s`, `1.5m`, a number of seconds or a timedelta into a timedelta."""
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
    if not math.isfinite(seconds) or abs(seconds) > _LONGEST:
        raise ValueError("duration is out of range (at most 30 days)")
    return timedelta(seconds=seconds)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
