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
BackendErrorPolicy = Literal["bypass", "raise"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Duration | None, *, what: str = "ttl") -> float:
    """Return ``value`` in seconds; raise ConfigurationError unless it is positive.

    Accepts seconds as int/float, a :class:`datetime.timedelta`, or a string such as
    ``"90"``, ``"500ms"``, ``"10m"``, ``"1h30m"``, ``"2d"``.
    """
    hint = f'write {what}=60 (seconds), {what}="10m", {what}="1h30m" or a timedelta'
    if isinstance(value, bool) or value is None:
        raise ConfigurationError(
            f"{what} must be a positive duration, got {value!r}: {hint}"
        )
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ConfigurationError(
                    f"cannot parse {what}={value!r}: {hint}"
                ) from None
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


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class BreakerPolicy:
    """Circuit breaker for cache operations.

    After ``failures`` consecutive unavailability errors the breaker opens: cache reads and
    writes are skipped at once (a few microseconds) for ``reset_after`` seconds, then one
    probe is let through; its success closes the breaker, a failure opens it again with the
    delay doubled up to ``max_reset_after``.
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
