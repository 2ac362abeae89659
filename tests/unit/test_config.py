from __future__ import annotations

from datetime import timedelta

import pytest

from rcache import ConfigurationError, parse_duration
from rcache._breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from rcache._config import BreakerPolicy, RetryPolicy


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (60, 60.0),
        (0.5, 0.5),
        ("90", 90.0),
        ("500ms", 0.5),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        (timedelta(minutes=2), 120.0),
        ("10min", 600.0),
        ("10 mins", 600.0),
        ("2 hours", 7200.0),
        ("1 hour", 3600.0),
        ("1.5h", 5400.0),
        ("30 seconds", 30.0),
        ("30s", 30.0),
        ("45 sec", 45.0),
        ("250ms", 0.25),
        ("250 milliseconds", 0.25),
        ("1h 30m", 5400.0),
        ("1 hour 30 minutes", 5400.0),
        ("1 hour, 30 minutes", 5400.0),
        ("1 hour and 30 minutes", 5400.0),
        ("2 Days", 172800.0),
        ("1 week", 604800.0),
        ("3 hrs", 10800.0),
        (" 5m ", 300.0),
        (".5s", 0.5),
        ("1.5", 1.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        "0",
        "-5",
        "ten",
        "10x",
        "",
        "m10",
        "10 parsecs",
        "1h30",
        "h",
        "1 hour,",
        "and 1h",
        "1..5h",
        "10 minutes ago",
        "1e3 s",
        None,
        True,
        [1],
        float("nan"),
        float("inf"),
        timedelta(0),
    ],
)
def test_parse_duration_rejects_with_a_hint(value: object) -> None:
    with pytest.raises(ConfigurationError, match="ttl=60"):
        parse_duration(value)  # type: ignore[arg-type]


def test_policies_validate() -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigurationError):
        BreakerPolicy(failures=0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    changes: list[int] = []
    b = CircuitBreaker(
        BreakerPolicy(failures=2, reset_after=1.0, max_reset_after=4.0), clock
    )
    b.on_change = changes.append
    assert b.allow()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()  # the one probe
    assert b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.failure()  # probe failed: open again, delay doubled
    assert b.state == OPEN
    clock.now += 1.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_breaker_behind_sentinel_probes_every_reset_after() -> None:
    """No doubling when steady() (a Sentinel primary): a failover done at 3.1 s is
    probed at 4 s, not at 7 s (probes at 1, 3, 7 s with doubling)."""
    clock = Clock()
    b = CircuitBreaker(
        BreakerPolicy(failures=1, reset_after=1.0), clock, steady=lambda: True
    )
    b.failure()
    for _ in range(5):
        assert not b.allow()
        clock.now += 1.0
        assert b.allow()  # a probe every reset_after
        b.failure()
    clock.now += 1.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED


def test_breaker_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(BreakerPolicy(failures=2), Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == CLOSED


def test_blocked_is_a_read_only_check() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(failures=1, reset_after=1.0), clock)
    assert not b.blocked()
    b.failure()
    assert b.blocked() and b.state == OPEN
    clock.now += 1.0
    assert not b.blocked()
    assert b.state == OPEN  # unchanged: the probe is still granted by allow()
    assert b.allow() and b.state == HALF_OPEN
