"""Pure configuration helpers: durations, retry policy, breaker settings.

Nothing here does IO; every function is tested once and shared by the sync and async
drivers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Union

from rcache._exceptions import ConfigurationError

__all__ = ["BackendErrorPolicy", "Duration", "RetryPolicy", "parse_duration"]

Duration = Union[int, float, str, timedelta]  # noqa: UP007 (a runtime alias on 3.10)
"""A duration: seconds (``int``/``float``), a string such as ``"10m"`` or ``"1h30m"``, or
a ``timedelta`` (read by :func:`parse_duration`)."""
BackendErrorPolicy = Literal["bypass", "raise"]

#: Unit spellings accepted in duration strings (lower case), in seconds.
_UNITS: dict[str, float] = {}
for _seconds, _names in (
    (0.001, ("ms", "msec", "msecs", "millisecond", "milliseconds")),
    (1.0, ("s", "sec", "secs", "second", "seconds")),
    (60.0, ("m", "min", "mins", "minute", "minutes")),
    (3600.0, ("h", "hr", "hrs", "hour", "hours")),
    (86400.0, ("d", "day", "days")),
    (604800.0, ("w", "wk", "wks", "week", "weeks")),
):
    _UNITS.update(dict.fromkeys(_names, _seconds))
del _seconds, _names
#: One "<number> <unit>" part; parts after the first may follow ", " or " and ".
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*")
_SEPARATOR = re.compile(r"(?:,|and\b)\s*")


def _parse_text(text: str) -> float | None:
    """Seconds in ``text`` ("90", "10min", "2 hours", "1h30m", "1 hour, 30 minutes"),
    or None if it is not a duration."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    pos, seconds = 0, 0.0
    while True:
        match = _PART.match(text, pos)
        if match is None or match.group(2) not in _UNITS:
            return None
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
        if pos == len(text):
            return seconds
        separator = _SEPARATOR.match(text, pos)
        if separator is not None:
            pos = separator.end()


def parse_duration(value: Duration | None, *, what: str = "ttl") -> float:
    """Return ``value`` in seconds; raise ConfigurationError unless it is positive.

    Accepts seconds as int/float, a :class:`datetime.timedelta`, or a string: a number
    of seconds (``"90"``) or number-unit parts such as ``"250ms"``, ``"30 seconds"``,
    ``"10m"``, ``"10min"``, ``"1.5h"``, ``"2 hours"``, ``"1h30m"``,
    ``"1 hour, 30 minutes"``, ``"2d"``, ``"1 week"`` (units: ms, s/sec/second,
    m/min/minute, h/hr/hour, d/day, w/week, singular or plural, any case).
    """
    hint = (
        f'write {what}=60 (seconds), {what}="10min", {what}="2 hours", '
        f'{what}="1h30m" or a timedelta'
    )
    if isinstance(value, bool) or value is None:
        raise ConfigurationError(
            f"{what} must be a positive duration, got {value!r}: {hint}"
        )
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        parsed = _parse_text(value)
        if parsed is None:
            raise ConfigurationError(f"cannot parse {what}={value!r}: {hint}")
        seconds = parsed
    else:
        raise ConfigurationError(
            f"{what} must be a duration, got {type(value).__name__}: {hint}"
        )
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigurationError(
            f"{what} must be positive and finite, got {value!r}: {hint}"
        )
    return seconds


def ttl_ms(seconds: float) -> int:
    """Milliseconds for PX/PEXPIRE, never 0 (which Redis rejects)."""
    return max(1, int(seconds * 1000))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient Redis errors (connection reset, timeout).

    Jittered exponential backoff bounded by ``attempts`` and ``max_time`` seconds in total,
    executed with tenacity. redis-py's own retries are switched off so they cannot add
    seconds per call underneath (cache.md §4: redis-py 8.1 blocked ~4 s per call).
    """

    attempts: int = 2
    backoff: float = 0.02
    max_backoff: float = 0.2
    max_time: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(
                "RetryPolicy(attempts=...) counts the first try: write attempts=1 for no retry"
            )
        if self.backoff < 0 or self.max_backoff < 0 or self.max_time <= 0:
            raise ConfigurationError(
                "RetryPolicy backoff/max_backoff >= 0 and max_time > 0"
            )


@dataclass(frozen=True)
class BreakerPolicy:
    """Circuit breaker for cache operations.

    After ``failures`` consecutive unavailability errors the breaker opens: cache reads and
    writes are skipped at once (a few microseconds) for ``reset_after`` seconds, then one
    probe is let through; its success closes the breaker, a failure opens it again with the
    delay doubled up to ``max_reset_after`` (behind Sentinel, not doubled: a failover
    ends when a replica is promoted, and the next probe should follow at once).
    """

    failures: int = 2
    reset_after: float = 1.0
    max_reset_after: float = 30.0

    def __post_init__(self) -> None:
        if (
            self.failures < 1
            or self.reset_after <= 0
            or self.max_reset_after < self.reset_after
        ):
            raise ConfigurationError(
                "BreakerPolicy needs failures >= 1 and 0 < reset_after <= max_reset_after"
            )
