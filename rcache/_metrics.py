"""The metrics sink protocol, and the in-memory default.

The cache and locks report events to ``Cache.metrics``. The default, ``InMemoryMetrics``,
counts them in a dict (so errors are always counted, even without prometheus-client);
``rcache.metrics.PrometheusMetrics`` exports the same events to Prometheus. Labels are
bounded: a cache (function) name or lock name, never keys, arguments or values.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

__all__ = ["InMemoryMetrics", "MetricsSink", "bypass_counter", "untimed_bypass"]


class MetricsSink(Protocol):
    """Where the cache and locks report events: ``Cache(metrics=...)``.

    Implemented by :class:`InMemoryMetrics` (the default) and
    ``rcache.metrics.PrometheusMetrics``; any object with these methods will do. Labels
    are names only (a function, ``Cache`` or lock name), never keys or values.
    """

    def register_cache(self, cache: str) -> None:
        """A decorated function or ``Cache`` named ``cache`` exists: create its label children."""

    def cache_get(self, cache: str, result: str) -> None:
        """A read of ``cache`` ended: ``result`` is ``hit``, ``miss``, ``stale``,
        ``coalesced`` or ``local_hit`` (served by the local tier, no round trip)."""

    def cache_put(self, cache: str) -> None:
        """A value of ``cache`` was stored."""

    def cache_removal(self, cache: str) -> None:
        """An entry of ``cache`` was invalidated or deleted."""

    def cache_load(self, cache: str, result: str, seconds: float) -> None:
        """The function of ``cache`` ran for ``seconds``: ``result`` is ``success`` or ``failure``."""

    def cache_error(self, cache: str, operation: str, error: str) -> None:
        """A Redis ``operation`` of ``cache`` failed with ``error`` (an exception class name)."""

    def cache_bypassed(self, cache: str, result: str, seconds: float) -> None:
        """A call of ``cache`` made while the circuit breaker was open ran the function
        without Redis for ``seconds`` (``result``: ``success`` or ``failure``). Counts,
        in one call, what ``cache_error(cache, "get", "CircuitOpen")``,
        ``cache_get(cache, "miss")`` and ``cache_load(cache, result, seconds)`` count
        (rcache calls it only if present, else those three, when the call ends)."""

    def breaker_state(self, state: int, cache: str) -> None:
        """The circuit breaker moved to ``state``: 0 closed, 1 open, 2 half-open."""

    def register_lock(self, lock: str) -> None:
        """A lock (or ``@locked`` template) named ``lock`` exists: create its label children."""

    def lock_acquire(self, lock: str, result: str) -> None:
        """An acquire ended: ``result`` is ``acquired``, ``busy``, ``timeout``, ``error``
        or ``unreplicated`` (granted, but too few replicas acknowledged: min_replicas=)."""

    def lock_wait(self, lock: str, seconds: float) -> None:
        """An acquire waited ``seconds`` before it ended."""

    def lock_held(self, lock: str, seconds: float) -> None:
        """A hold ended after ``seconds``."""

    def lock_release(self, lock: str, result: str) -> None:
        """A release ended: ``result`` is ``released``, ``not_owned`` or ``unconfirmed``
        (sent, but its replies were lost)."""

    def lock_renewal(self, lock: str, result: str) -> None:
        """A lease renewal ended: ``result`` is ``renewed`` or ``lost``."""

    def locks_held_change(self, lock: str, delta: int) -> None:
        """The number of holds of ``lock`` in this process changed by ``delta``."""

    def lock_eviction_risk(self, policy: str) -> None:
        """A lock server's ``maxmemory-policy`` (``policy``) can evict held locks
        (reported once per ``Cache`` and process; rcache calls it only if present)."""

    def local_invalidations(self, cache: str, keys: int) -> None:
        """The local tier of ``cache`` received invalidations of ``keys`` Redis keys
        (rcache calls the ``local_*`` methods only if present)."""

    def local_flush(self, cache: str, reason: str) -> None:
        """The local tier of ``cache`` was emptied: ``reason`` is ``disconnect`` (the
        listener lost its connection: a restart, a kill, a network fault),
        ``reconnect``, ``flushall`` (FLUSHALL/FLUSHDB), ``fork``, ``clear`` or
        ``topology`` (Redis Cluster: the slot map changed, or a read met MOVED/ASK)."""

    def local_entries(self, cache: str, entries: int) -> None:
        """The local tier of ``cache`` holds ``entries`` entries now."""


def bypass_counter(sink: MetricsSink) -> Callable[[str, str, float], None]:
    """``sink.cache_bypassed``, or the three calls it stands for where the sink has
    none: a call while the breaker is open has a budget of 2.5 us, and each sink call
    costs about 0.3 us of it."""
    counted: Callable[[str, str, float], None] | None = getattr(
        sink, "cache_bypassed", None
    )
    if counted is not None:
        return counted

    def count(cache: str, result: str, seconds: float) -> None:
        sink.cache_error(cache, "get", "CircuitOpen")
        sink.cache_get(cache, "miss")
        sink.cache_load(cache, result, seconds)

    return count


def _tally() -> Callable[[Any, Iterable[Any]], None] | None:
    """CPython's C ``_count_elements(mapping, keys)``: adds 1 per key to a Counter in one
    call that runs no Python code (tuple-of-str keys), so no other thread can interleave
    with it while the GIL is held: half the cost of a lock around ``+=``. None where that
    does not hold (another interpreter, or a free-threaded build without the GIL)."""
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    try:
        module: Any = importlib.import_module("_collections")  # untyped C module
        tally: Callable[[Any, Iterable[Any]], None] = module._count_elements
    except (ImportError, AttributeError):
        return None
    return tally


_TALLY = _tally()


class InMemoryMetrics:
    """Counts events in process memory; ``counts`` maps (event, labels...) to a count.

    Example: ``cache.metrics.count("cache_gets", "myapp.get_user", "hit")``.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.breaker = 0
        #: entries in each local tier, by cache name
        self.local: dict[str, int] = {}
        self._lock = threading.Lock()
        #: cache_bypassed's events by cache name, then result: built once per name
        self._bypassed: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {}
        # Each event is one call of this, written in the method itself: a shared
        # helper taking *event cost a cached hit 12 more bytecodes per event.
        self._add = _TALLY if _TALLY is not None else self._locked_tally

    def count(self, *event: str) -> int:
        """How many times ``event`` (name, then labels) was reported."""
        return self.counts[event]

    def _locked_tally(self, counts: Any, events: Iterable[tuple[str, ...]]) -> None:
        with self._lock:  # Counter += is not atomic across threads
            for event in events:
                counts[event] += 1

    def register_cache(self, cache: str) -> None:
        pass

    def cache_get(self, cache: str, result: str) -> None:
        self._add(self.counts, (("cache_gets", cache, result),))

    def cache_put(self, cache: str) -> None:
        self._add(self.counts, (("cache_puts", cache),))

    def cache_removal(self, cache: str) -> None:
        self._add(self.counts, (("cache_removals", cache),))

    def cache_load(self, cache: str, result: str, seconds: float) -> None:
        self._add(self.counts, (("cache_loads", cache, result),))

    def cache_error(self, cache: str, operation: str, error: str) -> None:
        self._add(self.counts, (("cache_errors", cache, operation, error),))

    def cache_bypassed(self, cache: str, result: str, seconds: float) -> None:
        self._add(self.counts, self._bypass_keys(cache)[result])

    def _bypass_keys(self, cache: str) -> dict[str, tuple[tuple[str, ...], ...]]:
        # built once per name: building three tuples per call took as long as
        # counting them
        by_result = self._bypassed.get(cache)
        if by_result is None:
            skipped = (
                ("cache_errors", cache, "get", "CircuitOpen"),
                ("cache_gets", cache, "miss"),
            )
            by_result = self._bypassed[cache] = {
                r: (*skipped, ("cache_loads", cache, r)) for r in ("success", "failure")
            }
        return by_result

    def _bypass_success(self, cache: str) -> Callable[[], None]:
        """``cache_bypassed(cache, "success", ...)`` as one C call (see
        :func:`untimed_bypass`); ``counts`` is never replaced, so it may be bound."""
        return functools.partial(
            self._add, self.counts, self._bypass_keys(cache)["success"]
        )

    def breaker_state(self, state: int, cache: str = "") -> None:
        self.breaker = state

    def register_lock(self, lock: str) -> None:
        pass

    def lock_acquire(self, lock: str, result: str) -> None:
        self._add(self.counts, (("lock_acquires", lock, result),))

    def lock_wait(self, lock: str, seconds: float) -> None:
        self._add(self.counts, (("lock_waits", lock),))

    def lock_held(self, lock: str, seconds: float) -> None:
        self._add(self.counts, (("lock_holds", lock),))

    def lock_release(self, lock: str, result: str) -> None:
        self._add(self.counts, (("lock_releases", lock, result),))

    def lock_renewal(self, lock: str, result: str) -> None:
        self._add(self.counts, (("lock_renewals", lock, result),))

    def locks_held_change(self, lock: str, delta: int) -> None:
        with self._lock:
            self.counts[("locks_held", lock)] += delta

    def lock_eviction_risk(self, policy: str) -> None:
        self._add(self.counts, (("lock_eviction_risk", policy),))

    def local_invalidations(self, cache: str, keys: int) -> None:
        with self._lock:
            self.counts[("local_invalidations", cache)] += keys

    def local_flush(self, cache: str, reason: str) -> None:
        self._add(self.counts, (("local_flushes", cache, reason),))

    def local_entries(self, cache: str, entries: int) -> None:
        self.local[cache] = entries


def untimed_bypass(sink: MetricsSink, cache: str) -> Callable[[], None] | None:
    """What counts a successful call of ``cache`` made while the breaker is open, as one
    C call that needs no duration (no second clock read), where the sink keeps none:
    an :class:`InMemoryMetrics` whose ``cache_bypassed`` is its own. Else None (then
    :func:`bypass_counter`). Half the budget of that call was its one Python-level
    ``cache_bypassed`` call."""
    if (
        getattr(type(sink), "cache_bypassed", None)
        is not InMemoryMetrics.cache_bypassed
    ):
        return None
    return cast(InMemoryMetrics, sink)._bypass_success(cache)
