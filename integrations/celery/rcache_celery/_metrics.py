"""Prometheus collectors of rcache-celery, created at ``install()``, never at import.

When the cache's metrics sink is an ``rcache.metrics.PrometheusMetrics``, the collectors
below are registered in its registry with its ``counter``/``histogram``/``gauge``,
named under its namespace (``rcache_celery_dedup_total`` by default); otherwise every
call is a no-op. Labels are bounded: the task name, a fixed reason/result/action, the
cache name; never task ids, arguments or keys.

``PrometheusMetrics`` registers each collector once per registry, so installing on two
apps that share one does not register them twice ("Duplicated timeseries",
client_python #468).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rcache.metrics import PrometheusMetrics

__all__ = ["CeleryMetrics", "NullCeleryMetrics", "metrics_for"]


class NullCeleryMetrics:
    """The sink used when the cache's metrics are not a PrometheusMetrics."""

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
    def __init__(self, sink: PrometheusMetrics) -> None:
        c, h, g = sink.counter, sink.histogram, sink.gauge
        self.dedup_total = c(
            "celery_dedup",
            "apply_async calls of unique tasks, by outcome",
            ["task", "result"],
        )
        self.runtime_duplicates_total = c(
            "celery_runtime_duplicates",
            "Task copies ignored at run time because they did not own their guard key",
            ["task", "reason"],
        )
        self.lock_recoveries_total = c(
            "celery_lock_recoveries",
            "Guard keys released by the worker's main process for a task that could not",
            ["task", "reason"],
        )
        self.locked_total = c(
            "celery_locked",
            "Runs of locked tasks, by what happened",
            ["task", "action"],
        )
        self.warm_runs_total = c(
            "warm_runs",
            "Cache warming runs",
            ["cache", "result"],
        )
        self.warm_keys_total = c(
            "warm_keys",
            "Cache entries recomputed by warming",
            ["cache", "result"],
        )
        self.warm_duration_seconds = h(
            "warm_duration_seconds",
            "Duration of cache warming runs",
            ["cache", "result"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.warm_last_success = g(
            "warm_last_success_timestamp_seconds",
            "Unix time of the last successful warming run",
            ["cache"],
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


def metrics_for(sink: Any) -> NullCeleryMetrics:
    """Collectors on ``sink`` if it is a ``PrometheusMetrics`` (whose ``counter``,
    ``histogram`` and ``gauge`` register each collector once per registry: installing
    on two apps that share it registers nothing twice), else a no-op sink."""
    if not callable(getattr(sink, "counter", None)):
        return NullCeleryMetrics()
    return CeleryMetrics(sink)
