"""Concurrency caps and rate limits by key, and the weights fairness shares capacity by (pure).

Limits are written `action=N` (every key of that action) and `action:key=N` (one key, overriding
the action's). Rates are `action=N/period` or `action:key=N/period` with a duration period
(`100/1s`, `10/1m`): a token bucket holding N tokens, refilled at N per period. Counts are kept per
(tenant, action, key); the same limit applies in every tenant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from sluicegate.durations import parse_duration
from sluicegate.errors import InvalidInput


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """`a=1,b:c=2` as a mapping; raises InvalidInput naming the bad entry."""
    pairs: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InvalidInput(f"{what}: expected name=value, got {item[:60]!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def parse_counts(text: str, what: str, low: int = 0, high: int = 1_000_000) -> dict[str, int]:
    counts = {}
    for name, value in parse_pairs(text, what).items():
        try:
            number = int(value)
        except ValueError as err:
            raise InvalidInput(f"{what}: {name} must be a whole number, got {value[:20]!r}") from err
        if not low <= number <= high:
            raise InvalidInput(f"{what}: {name} must be between {low} and {high}")
        counts[name] = number
    return counts


@dataclass(frozen=True, slots=True)
class Rate:
    tokens: int
    period: float  # seconds


def parse_rates(text: str, what: str) -> dict[str, Rate]:
    rates = {}
    for name, value in parse_pairs(text, what).items():
        count, sep, period = value.partition("/")
        try:
            tokens = int(count)
            seconds = parse_duration(period).total_seconds() if sep else 1.0
        except ValueError as err:
            raise InvalidInput(f"{what}: {name} must look like 100/1s, got {value[:20]!r}") from err
        if tokens < 1 or seconds <= 0:
            raise InvalidInput(f"{what}: {name} needs at least one task per a positive period")
        rates[name] = Rate(tokens, seconds)
    return rates


T = TypeVar("T")


def _lookup(table: Mapping[str, T], action: str, key: str) -> T | None:
    """The entry for `action:key`, else for `action`."""
    if key:
        found = table.get(f"{action}:{key}")
        if found is not None:
            return found
    return table.get(action)


class ConcurrencyLimits:
    """The cap on running tasks of (action, key); None when there is none."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        self._caps = dict(caps)

    def __bool__(self) -> bool:
        return bool(self._caps)

    def cap(self, action: str, key: str) -> int | None:
        return _lookup(self._caps, action, key) if key else None


class RateLimits:
    """Token buckets per (tenant, action, key), refilled by an explicit clock."""

    def __init__(self, rates: Mapping[str, Rate]) -> None:
        self._rates = dict(rates)
        self._buckets: dict[tuple[str, str, str], tuple[float, float]] = {}  # -> (tokens, refilled at)

    def __bool__(self) -> bool:
        return bool(self._rates)

    def _rate(self, action: str, key: str) -> Rate | None:
        return _lookup(self._rates, action, key)

    def _level(self, scope: tuple[str, str, str], rate: Rate, now: float) -> float:
        tokens, at = self._buckets.get(scope, (float(rate.tokens), now))
        return min(float(rate.tokens), tokens + (now - at) * rate.tokens / rate.period)

    def wait(self, tenant: str, action: str, key: str, now: float) -> float:
        """Seconds until a task of this scope may start (0 when it may now)."""
        rate = self._rate(action, key)
        if rate is None:
            return 0.0
        level = self._level((tenant, action, key), rate, now)
        return 0.0 if level >= 1.0 else (1.0 - level) * rate.period / rate.tokens

    def take(self, tenant: str, action: str, key: str, now: float) -> None:
        rate = self._rate(action, key)
        if rate is not None:
            scope = (tenant, action, key)
            self._buckets[scope] = (self._level(scope, rate, now) - 1.0, now)

    def give_back(self, tenant: str, action: str, key: str, now: float) -> None:
        """Return a token taken for a placement that did not happen (its publish failed)."""
        rate = self._rate(action, key)
        if rate is not None:
            scope = (tenant, action, key)
            self._buckets[scope] = (min(float(rate.tokens), self._level(scope, rate, now) + 1.0), now)


class Weights:
    """Relative shares by name (tenants, fairness keys); 1 when not given."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        self._weights = dict(weights)

    def __call__(self, name: str) -> int:
        return self._weights.get(name, 1)
