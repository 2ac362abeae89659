"""Pure configuration helpers: durations, retry policy, breaker settings, and the
option objects of the decorators (validated once, frozen).

Nothing here does IO; every function is tested once and shared by the sync and async
drivers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Union

from rcache._exceptions import ConfigurationError

__all__ = [
    "BackendErrorPolicy",
    "CachedOptions",
    "Duration",
    "LockOptions",
    "RetryPolicy",
    "TxOptions",
    "check_policy",
    "parse_duration",
]

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
    executed with tenacity. A timeout (no reply within the socket timeout) is retried
    only when the socket timeout is at most ``max_time``: a retry on a hung server
    would wait as long again. redis-py's own retries are switched off so they cannot add
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


def check_policy(policy: object) -> None:
    """Raise ConfigurationError unless ``policy`` is an ``on_backend_error`` value."""
    if policy not in ("bypass", "raise"):
        raise ConfigurationError(
            f"on_backend_error must be 'bypass' or 'raise', got {policy!r}"
        )


@dataclass(frozen=True, slots=True)
class CachedOptions:
    """The options of ``@cache.cached``, validated once by :meth:`build`.

    Durations are seconds. ``ttl`` and ``on_backend_error`` are None when the function
    takes the cache's (and follows ``Cache.configure()``); ``wait`` is resolved
    (``lease_ttl`` by default) and ``early`` is the XFetch ``beta`` (0: off).
    """

    ttl: float | None = None
    key: str | Callable[..., str] | None = None
    ignore: tuple[str, ...] | str = ()
    name: str | None = None
    cache_none: bool = True
    unless: Callable[[Any], bool] | None = None
    on_unserializable: Literal["raise", "skip"] = "raise"
    on_backend_error: BackendErrorPolicy | None = None
    tags: tuple[str, ...] = ()
    beta: float = 0.0
    stale: float = 0.0
    stale_if_error: float = 0.0
    stampede: bool = True
    lease_ttl: float = 10.0
    wait: float = 10.0
    on_wait_timeout: Literal["compute", "raise"] = "compute"
    refresh_runner: Callable[[Callable[[], Any]], Any] | None = None
    #: the local tier: None (the Cache's default), True, False or a LocalTier
    #: (checked by ``Cache.cached``: this leaf module cannot import rcache._local)
    local: Any = None

    @classmethod
    def build(
        cls,
        *,
        ttl: Duration | None = None,
        key: str | Callable[..., str] | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
        cache_none: bool = True,
        unless: Callable[[Any], bool] | None = None,
        on_unserializable: Literal["raise", "skip"] = "raise",
        on_backend_error: BackendErrorPolicy | None = None,
        tags: Iterable[str] = (),
        early: bool | float = False,
        stale: Duration | None = None,
        stale_if_error: Duration | None = None,
        stampede: bool = True,
        lease_ttl: Duration = 10.0,
        wait: Duration | None = None,
        on_wait_timeout: Literal["compute", "raise"] = "compute",
        refresh_runner: Callable[[Callable[[], Any]], Any] | None = None,
        local: Any = None,
    ) -> CachedOptions:
        """Validate ``cached()``'s keyword arguments (the same names and meanings).

        :raises ConfigurationError: the first invalid option, with how to write it.
        """
        seconds = None if ttl is None else parse_duration(ttl)
        if on_unserializable not in ("raise", "skip"):
            raise ConfigurationError(
                f"on_unserializable must be 'raise' or 'skip', got {on_unserializable!r}"
            )
        if on_backend_error is not None:
            check_policy(on_backend_error)
        if unless is not None and not callable(unless):
            raise ConfigurationError(
                "unless= takes a callable: unless=lambda result: ..."
            )
        # a str is passed on as given: KeyBuilder says what to write instead
        ignored = ignore if isinstance(ignore, str) else tuple(ignore)
        if isinstance(tags, str):
            raise ConfigurationError(f"tags= takes a list: write tags=[{tags!r}]")
        if isinstance(early, bool):
            beta = 1.0 if early else 0.0
        elif isinstance(early, (int, float)) and early > 0:
            beta = float(early)
        else:
            raise ConfigurationError(
                f"early= takes True or a beta > 0 (1.0 is XFetch's optimum), got {early!r}"
            )
        lease = parse_duration(lease_ttl, what="lease_ttl")
        stale_s = 0.0 if stale is None else parse_duration(stale, what="stale")
        stale_if_error_s = (
            0.0
            if stale_if_error is None
            else parse_duration(stale_if_error, what="stale_if_error")
        )
        wait_s = lease if wait is None else parse_duration(wait, what="wait")
        if on_wait_timeout not in ("compute", "raise"):
            raise ConfigurationError(
                f"on_wait_timeout must be 'compute' or 'raise', got {on_wait_timeout!r}"
            )
        if refresh_runner is not None and not callable(refresh_runner):
            raise ConfigurationError("refresh_runner= takes a callable: runner(job)")
        return cls(
            ttl=seconds,
            key=key,
            ignore=ignored,
            name=name,
            cache_none=cache_none,
            unless=unless,
            on_unserializable=on_unserializable,
            on_backend_error=on_backend_error,
            tags=tuple(tags),
            beta=beta,
            stale=stale_s,
            stale_if_error=stale_if_error_s,
            stampede=stampede,
            lease_ttl=lease,
            wait=wait_s,
            on_wait_timeout=on_wait_timeout,
            refresh_runner=refresh_runner,
            local=local,
        )


#: Retries of a transaction after its first attempt (so at most 17 runs of its function).
TX_RETRIES = 16
#: Upper bound, in seconds, on the time one transaction spends retrying.
TX_MAX_TIME = 5.0


@dataclass(frozen=True, slots=True)
class TxOptions:
    """How one transaction retries on conflict (``transaction``, ``update`` and their
    twins), validated once: build it with :meth:`of` from the caller's arguments.

    :ivar retries: runs after the first one before giving up (an int >= 0).
    :ivar max_time: seconds the retries may take in total, counted from the first
        failed attempt.
    """

    retries: int = TX_RETRIES
    max_time: float = TX_MAX_TIME

    def __post_init__(self) -> None:
        retries = self.retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(
                f"retries= counts retries after the first attempt (an int >= 0), "
                f"got {retries!r}"
            )
        parse_duration(self.max_time, what="max_time")

    @classmethod
    def of(cls, retries: int, max_time: Duration) -> TxOptions:
        """The options for ``retries=`` and ``max_time=`` (seconds, ``"2s"``, a
        timedelta); raises ConfigurationError for a bad value."""
        if type(max_time) is not float:  # the default and most callers: no parsing
            max_time = parse_duration(max_time, what="max_time")
        return cls(retries, max_time)


#: A lock's default lease (seconds).
DEFAULT_LOCK_TTL = 30.0
#: Lease bounds: below 10 ms a lease ends before a round trip under load confirms it;
#: above a year is a mistake (ttl=1e17 overflows Redis' PX and the ZSET scores).
_MIN_LOCK_TTL = 0.01
_MAX_LOCK_TTL = 365 * 86400.0


def lock_ttl(value: Duration, what: str = "ttl") -> float:
    """A lock lease in seconds, between 10 ms and a year."""
    seconds = parse_duration(value, what=what)
    if not _MIN_LOCK_TTL <= seconds <= _MAX_LOCK_TTL:
        raise ConfigurationError(
            f"lock {what} must be between 10ms and 365 days, got {value!r}: write "
            f'{what}=30 (seconds) or {what}="5m"; for long jobs keep a short lease '
            "and let auto-renewal (with max_hold=) extend it"
        )
    return seconds


def wait_timeout(value: float | Duration | None) -> float | None:
    """A lock wait: ``None`` (forever), ``0`` (one try) or a positive duration (s)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    return parse_duration(value, what="timeout")


@dataclass(frozen=True, slots=True)
class LockOptions:
    """The options every lock kind takes (``Cache.lock``, ``rwlock``, ``semaphore``,
    ``locked``), validated once: durations given as ``"5m"`` or a timedelta are stored
    in seconds, and a bad value raises :class:`ConfigurationError` where it was given.

    :param ttl: the lease (10 ms to a year; default 30 s).
    :param timeout: longest wait of ``with``/``acquire()``: None forever, 0 one try.
    :param auto_renew: renew every ttl/3 (None: on in ``with`` and ``@locked``).
    :param max_hold: stop renewing after this long.
    :param on_lost: called once with the Lease when it is found lost.
    :param raise_on_not_owned: raise on a release that found the lease gone.
    :param metrics_name: the metric label (default: the lock's name).
    """

    ttl: float = DEFAULT_LOCK_TTL
    timeout: float | None = None
    auto_renew: bool | None = None
    max_hold: float | None = None
    on_lost: Callable[[Any], object] | None = None
    raise_on_not_owned: bool = True
    metrics_name: str | None = None

    def __post_init__(self) -> None:
        # Normalized in place: the fields then always hold seconds (frozen, so through
        # object.__setattr__, as dataclasses' own docs show for derived fields).
        object.__setattr__(self, "ttl", lock_ttl(self.ttl))
        object.__setattr__(self, "timeout", wait_timeout(self.timeout))
        if self.max_hold is not None:
            hold = parse_duration(self.max_hold, what="max_hold")
            object.__setattr__(self, "max_hold", hold)
        if self.on_lost is not None and not callable(self.on_lost):
            raise ConfigurationError(
                "on_lost must be a callable taking the Lease, got "
                f"{type(self.on_lost).__name__}"
            )

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> LockOptions:
        """Validate keyword options as given by a caller (durations in any form the
        parameters accept); an unknown name raises TypeError, as a signature would."""
        return cls(**options)
