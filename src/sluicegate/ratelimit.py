"""Token buckets and a log line that speaks at most once per interval (pure: time is passed in)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    """`rate` tokens a second up to `burst`; each allowed event takes one."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Buckets:
    """One bucket per key, the least recently used forgotten past `keep` (a forgotten key starts full)."""

    def __init__(self, rate: float, burst: int, keep: int = 100_000) -> None:
        self.rate, self.burst, self.keep = rate, float(burst), keep
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True  # no limit
        bucket = self._buckets.pop(key, None) or Bucket(self.rate, self.burst, self.burst, now)
        self._buckets[key] = bucket
        while len(self._buckets) > self.keep:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)


class QuietLog:
    """Logs one line per `interval` seconds at most, telling how many like it were left out meanwhile.

    Bad input from outside can come a thousand times a second: a line each would let anyone fill the
    disk, and a traceback each would bury everything else.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger, self.interval, self.level = logger, interval, level
        self._last: float | None = None
        self.suppressed = 0
        self.total = 0

    def __call__(self, now: float, message: str, *args: object) -> bool:
        """Log `message` unless a line went out within the interval; True if it was logged."""
        self.total += 1
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += " (%d more like it since the last such line)"
            args = (*args, self.suppressed)
        self.logger.log(self.level, message, *args)
        self._last, self.suppressed = now, 0
        return True
