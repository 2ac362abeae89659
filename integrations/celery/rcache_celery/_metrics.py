"""Prometheus collectors of rcache-celery, created at ``install()``, never at import.

When the cache's metrics sink exposes a ``prometheus_client`` ``CollectorRegistry`` as
``.registry`` (``rcache.metrics.PrometheusMetrics``), the collectors below are
registered on it; otherwise every call is a no-op. Labels are bounded: the task name,
a fixed reason/result/action, the cache name; never task ids, arguments or keys.

Collectors are kept per registry so that installing on two apps that share a registry
does not register them twice ("Duplicated timeseries", client_python #468).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["CeleryMetrics", "NullCeleryMetrics", "metrics_for"]


class NullCeleryMetrics:
    """The sink used when the cache has no Prometheus registry."""

    def dedup(self, task: str, result: str) -> None:
        pass

    def runtime_duplicate(self, task: str, reason: str) -> None:
        pass

    def recovery(self, task: str, reason: str) -> None:
        pass

    def locked(self, task: str, action: str) -> None:
        pass

    def warm_run(
        self, cache: str, result: str, done: int, failed: int, seconds: float
    ) -> None:
        pass


class CeleryMetrics(NullCeleryMetrics):
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.dedup_total = Counter(
            "rcache_celery_dedup",
            "apply_async calls of unique tasks, by outcome",
            ["task", "result"],
            registry=registry,
        )
        self.runtime_duplicates_total = Counter(
            "rcache_celery_runtime_duplicates",
            "Task copies ignored at run time because they did not own their guard key",
            ["task", "reason"],
            registry=registry,
        )
        self.lock_recoveries_total = Counter(
            "rcache_celery_lock_recoveries",
            "Guard keys released by the worker's main process for a task that could not",
            ["task", "reason"],
            registry=registry,
        )
        self.locked_total = Counter(
            "rcache_celery_locked",
            "Runs of locked tasks, by what happened",
            ["task", "action"],
            registry=registry,
        )
        self.warm_runs_total = Counter(
            "rcache_warm_runs",
            "Cache warming runs",
            ["cache", "result"],
            registry=registry,
        )
        self.warm_keys_total = Counter(
            "rcache_warm_keys",
            "Cache entries recomputed by warming",
            ["cache", "result"],
            registry=registry,
        )
        self.warm_duration_seconds = Histogram(
            "rcache_warm_duration_seconds",
            "Duration of cache warming runs",
            ["cache", "result"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.warm_last_success = Gauge(
            "rcache_warm_last_success_timestamp_seconds",
            "Unix time of the last successful warming run",
            ["cache"],
            registry=registry,
            multiprocess_mode="max",
        )

    def dedup(self, task: str, result: str) -> None:
        self.dedup_total.labels(task, result).inc()

    def runtime_duplicate(self, task: str, reason: str) -> None:
        self.runtime_duplicates_total.labels(task, reason).inc()

    def recovery(self, task: str, reason: str) -> None:
        self.lock_recoveries_total.labels(task, reason).inc()

    def locked(self, task: str, action: str) -> None:
        self.locked_total.labels(task, action).inc()

    def warm_run(
        self, cache: str, result: str, done: int, failed: int, seconds: float
    ) -> None:
        import time

        self.warm_runs_total.labels(cache, result).inc()
        if done:
            self.warm_keys_total.labels(cache, "success").inc(done)
        if failed:
            self.warm_keys_total.labels(cache, "failure").inc(failed)
        self.warm_duration_seconds.labels(cache, result).observe(seconds)
        if result == "success":
            self.warm_last_success.labels(cache).set(time.time())


_by_registry: weakref.WeakKeyDictionary[Any, CeleryMetrics] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def metrics_for(sink: Any) -> NullCeleryMetrics:
    """Collectors on ``sink.registry`` if it is a CollectorRegistry, else a no-op sink."""
    registry = getattr(sink, "registry", None)
    if registry is None:
        return NullCeleryMetrics()
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:  # pragma: no cover - the registry came from somewhere
        return NullCeleryMetrics()
    if not isinstance(registry, CollectorRegistry):
        return NullCeleryMetrics()
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = CeleryMetrics(registry)
        return found
