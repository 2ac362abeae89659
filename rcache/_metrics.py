"""The metrics sink protocol, and the in-memory default.

The cache and locks report events to ``Cache.metrics``. The default, ``InMemoryMetrics``,
counts them in a dict (so errors are always counted, even without prometheus-client);
``rcache.metrics.PrometheusMetrics`` exports the same events to Prometheus. Labels are
bounded: a cache (function) name or lock name, never keys, arguments or values.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["InMemoryMetrics", "MetricsSink"]


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

    def breaker_state(self, state: int, cache: str) -> None:
        """The circuit breaker moved to ``state``: 0 closed, 1 open, 2 half-open."""

    def register_lock(self, lock: str) -> None:
        """A lock (or ``@locked`` template) named ``lock`` exists: create its label children."""

    def lock_acquire(self, lock: str, result: str) -> None:
        """An acquire ended: ``result`` is ``acquired``, ``busy``, ``timeout`` or ``error``."""

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
