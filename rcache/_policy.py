"""The failure policy of cache commands, decided once (pure apart from counting/logging).

A *cache* command fails open: while the circuit breaker is open it is skipped, and a
Redis error is counted, logged at most every 30 s and answered with :data:`BYPASS`
("carry on without Redis") under ``on_backend_error="bypass"``, or raised under
``"raise"``. Lock and transaction commands carry no :class:`Guard` and fail closed:
their errors always raise. Which commands are which is marked where they are made;
what a failure means is written here only (the drivers in ``_flow.py`` call it from
their one guarded path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from rcache._breaker import CircuitBreaker
from rcache._exceptions import (
    BackendMisconfiguredError,
    BackendUnavailableError,
    ConfigurationError,
    RCacheError,
)
from rcache._logging import RateLimitedLog, cache_log

__all__ = ["BYPASS", "MISSING", "Failures", "Guard"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: A guarded command's reply when the policy says to carry on without Redis.
BYPASS: Final[Any] = _Sentinel("BYPASS")
#: "No value": a miss, or an entry that could not be decoded.
MISSING: Final[Any] = _Sentinel("MISSING")


@dataclass(frozen=True, slots=True)
class Guard:
    """Marks a command as a cache command: it fails open, counted under ``name``.

    :param name: the metric label (the cache's or the decorated function's name).
    :param operation: ``"get"``, ``"set"``, ``"delete"``... (the metric's operation).
    :param policy: ``"bypass"`` or ``"raise"`` (``on_backend_error``).
    """

    name: str
    operation: str
    policy: Literal["bypass", "raise"]


class Failures:
    """What a skipped, failed or hung cache command means, for one ``Cache``."""

    __slots__ = ("breaker", "describe", "log", "metrics")

    def __init__(
        self, breaker: CircuitBreaker, metrics: Any, describe: Any, log: RateLimitedLog
    ) -> None:
        self.breaker = breaker
        self.metrics = metrics
        self.describe = describe  # () -> "redis://host:port/db", passwords masked
        self.log = log

    def skipped(self, guard: Guard) -> Any:
        """The breaker is open: count, and raise under "raise", else BYPASS."""
        self.metrics.cache_error(guard.name, guard.operation, "CircuitOpen")
        if guard.policy == "raise":
            raise BackendUnavailableError(
                f"Redis at {self.describe()} is unavailable (circuit breaker open)"
            )
        return BYPASS

    def failed(self, guard: Guard, exc: RCacheError) -> Any:
        """A Redis error: count it (only unreachability opens the breaker), then raise
        under "raise", else log (rate-limited) and return BYPASS."""
        if isinstance(exc, ConfigurationError):
            # a setting to fix (a cluster's recorded slot groups differ), not a Redis
            # error: never bypassed, never counted as an outage
            raise exc
        # A wrong password or database is not an outage, and bypassing Redis for it
        # would hide the cause behind "circuit open".
        if isinstance(exc, BackendUnavailableError):
            self.breaker.failure()
        else:
            # Redis answered (READONLY after a failover, OOM, WRONGTYPE, NOPERM...): it
            # is reachable. Counting that as neither left a half-open breaker's probe
            # taken for good: every later call was skipped until a restart.
            self.breaker.success()
        original = getattr(exc, "original", None) or exc
        self.metrics.cache_error(guard.name, guard.operation, type(original).__name__)
        if guard.policy == "raise":
            raise exc
        # str(exc) is the server's error text (map_error strips echoed arguments),
        # never a value
        if isinstance(exc, BackendMisconfiguredError):
            topic = "misconfigured:" + guard.operation  # rate-limited per topic
            self.log.error(
                topic,
                "rcache: cache %s for %s failed: %s; carrying on without the cache",
                guard.operation,
                guard.name,
                exc,
            )
        else:
            self.log.warning(
                guard.operation,
                "rcache: cache %s for %s failed (%s); carrying on without the cache",
                guard.operation,
                guard.name,
                exc,
            )
        return BYPASS

    def hung(self, guard: Guard) -> Any:
        """A blocking wait got no reply at all: unavailability (breaker, metrics,
        policy), so that the caller computes without Redis."""
        return self.failed(
            guard,
            BackendUnavailableError(
                f"Redis at {self.describe()} did not answer a wait in time"
            ),
        )

    def breaker_changed(self, state: int, name: str) -> None:
        """Count and log a breaker state change (1 open, 0 closed)."""
        self.metrics.breaker_state(state, name)
        if state == 1:
            cache_log.warning(
                "rcache: Redis at %s is unavailable; cache bypassed until it answers "
                "again",
                self.describe(),
            )
        elif state == 0:
            cache_log.warning(
                "rcache: Redis at %s answers again; caching resumed", self.describe()
            )
