"""Prometheus metrics for rcache caches and locks (extra ``rcache-redis[prometheus]``).

Public and semver-covered, but not imported by ``rcache/__init__.py``: ``import
rcache`` works without ``prometheus_client``. Nothing happens at import time: collectors
exist only once you create a :class:`PrometheusMetrics`, and only in the registry you
give it::

    from rcache.metrics import PrometheusMetrics, start_http_server

    metrics = PrometheusMetrics()              # prometheus_client.REGISTRY
    cache = rcache.Cache(url, metrics=metrics)
    start_http_server(9100)                    # /metrics on 127.0.0.1:9100

Metric set (``namespace="rcache"``; labels are bounded: a cache or function name, a lock
name, a result; never keys, arguments, task ids or pids)::

    rcache_cache_gets_total{cache, result="hit|miss|stale|coalesced|local_hit"}
                                every call of a cached function counted once;
                                coalesced: got the value another caller computed;
                                local_hit: served by the local tier (no round trip)
    rcache_cache_puts_total{cache}
    rcache_cache_removals_total{cache}
    rcache_cache_load_duration_seconds{cache, result="success|failure"}   histogram
    rcache_cache_errors_total{cache, operation, error}
    rcache_cache_breaker_state{cache}           0 closed, 1 open, 2 half-open
    rcache_lock_acquires_total{lock, result="acquired|busy|timeout|error|unreplicated"}
    rcache_lock_wait_seconds{lock}              histogram
    rcache_lock_held_seconds{lock}              histogram
    rcache_lock_releases_total{lock, result="released|not_owned|unconfirmed"}
    rcache_lock_renewals_total{lock, result="renewed|lost"}
    rcache_locks_held{lock}                     gauge
    rcache_lock_eviction_risk_total{policy}     lock servers found with an evicting
                                                maxmemory-policy (once per Cache)
    rcache_local_invalidations_total{cache}     invalidated keys the local tier received
    rcache_local_flushes_total{cache, reason="disconnect|reconnect|flushall|fork|clear|topology"}
    rcache_local_entries{cache}                 entries held by the local tier (gauge)

There is deliberately no hit-ratio gauge: a ratio of ratios cannot be aggregated across
processes or instances. Compute it in PromQL (``contrib/prometheus/rules.yml`` records
it as ``rcache:cache_hit_ratio:rate5m``); ``coalesced`` calls count as hits there, since
they did not run the function (the ratio is the share of calls the cache saved), and
so do ``local_hit`` calls::

    sum by (cache) (rate(rcache_cache_gets_total{result=~"hit|local_hit|coalesced"}[5m]))
      / (sum by (cache) (rate(rcache_cache_gets_total[5m])) > 0)

Multi-process servers (gunicorn, Celery prefork, uWSGI): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory in the start-up shell, before Python
starts (prometheus_client picks its storage when it is first imported). Every process
then writes its values to that directory, and the exporters in this module
(:func:`start_http_server`, :func:`make_wsgi_app`, :func:`make_asgi_app`) serve the sum
over all processes from a fresh registry with a ``MultiProcessCollector``. Run exactly
one exporter (an exporter per child reports 1/N of the counts: PostHog PR #56109). See
the README section "Prometheus metrics" for the gunicorn ``child_exit`` hook and the
Celery prefork set-up.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar
from wsgiref.simple_server import WSGIServer

from rcache._exceptions import ConfigurationError

try:
    import prometheus_client
    from prometheus_client import (
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
    )
    from prometheus_client import values as _values
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "rcache.metrics needs prometheus-client: pip install 'rcache-redis[prometheus]'"
    ) from exc

__all__ = [
    "LOAD_BUCKETS",
    "LOCK_BUCKETS",
    "MetricsServer",
    "PrometheusMetrics",
    "export_registry",
    "make_asgi_app",
    "make_wsgi_app",
    "mark_process_dead",
    "multiprocess_dir",
    "start_http_server",
]

LOAD_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Buckets of ``rcache_cache_load_duration_seconds``: from 100 µs (a local computation)
to 30 s (a slow report); the default client_python buckets start at 5 ms, which puts
every cheap load in the first bucket."""
LOCK_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
"""Buckets of ``rcache_lock_wait_seconds`` and ``rcache_lock_held_seconds``: 1 ms to
10 min (locks guard jobs that run for minutes)."""

GET_RESULTS = ("hit", "miss", "stale", "coalesced", "local_hit")
LOAD_RESULTS = ("success", "failure")
ACQUIRE_RESULTS = ("acquired", "busy", "timeout", "error", "unreplicated")
RELEASE_RESULTS = ("released", "not_owned", "unconfirmed")
RENEWAL_RESULTS = ("renewed", "lost")

MultiprocessMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
]  # fmt: skip

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_C = TypeVar("_C", Counter, Gauge, Histogram)


def multiprocess_dir() -> str | None:
    """The ``PROMETHEUS_MULTIPROC_DIR`` in effect, or None outside multiprocess mode."""
    # prometheus_client still honours the deprecated lower-case name.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir"  # noqa: SIM112
    )
    return path or None


def _values_in_files() -> bool:
    """Did prometheus_client choose file-backed values (decided at its first import)?"""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


class PrometheusMetrics:
    """A metrics sink exporting rcache cache and lock events to Prometheus.

    Create one per process (and per registry) and pass it to every cache that should
    report: ``Cache(url, metrics=metrics)``. The cache registers each
    ``@cache.cached`` function and each lock name when it is decorated or created, and
    this object creates the label children then, so ``rate()`` and ratios work from the
    first scrape instead of appearing after the first miss.

    :param registry: the ``CollectorRegistry`` to register the collectors in; default
        ``prometheus_client.REGISTRY``. Tests pass ``CollectorRegistry()``.
    :param namespace: the metric name prefix (default ``"rcache"``).
    :raises ConfigurationError: the registry already holds rcache metrics (create one
        ``PrometheusMetrics`` per registry and share it), a bad namespace, or
        ``PROMETHEUS_MULTIPROC_DIR`` was set after prometheus_client was imported.

    Integrations (``rcache_celery``) add their own metrics to the same registry with
    :meth:`counter`, :meth:`histogram` and :meth:`gauge`; the registry itself is
    :attr:`registry`.

    Not for: per-key or per-user statistics (unbounded labels), or a process without
    ``prometheus_client`` (the default ``InMemoryMetrics`` needs nothing).

    Example::

        metrics = PrometheusMetrics()  # or registry=CollectorRegistry() in tests
        cache = rcache.Cache("redis://127.0.0.1:6379/0", prefix="shop", metrics=metrics)

        @cache.cached(ttl="10m")  # label cache="<module>.get_user"
        def get_user(user_id: int) -> dict: ...
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "rcache"
    ) -> None:
        if not isinstance(namespace, str) or not _NAME.match(namespace):
            raise ConfigurationError(
                f"namespace must be a Prometheus name like 'rcache', got {namespace!r}"
            )
        if multiprocess_dir() is not None and not _values_in_files():
            # Values would live in this process's memory while every exporter reads the
            # directory: the metrics would silently stay at zero.
            raise ConfigurationError(
                "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was "
                "imported, so this process's metrics would never reach the exporter: "
                "set it in the start-up shell (export PROMETHEUS_MULTIPROC_DIR=/path) "
                "before Python starts"
            )
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        self.namespace = namespace
        self._own: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()
        self._breaker_cache: str | None = None
        # Names already registered: cache.lock(name) registers on every call.
        self._registered: set[tuple[str, str]] = set()
        # fmt: off
        c, h, g = self.counter, self.histogram, self.gauge
        self._gets = _Family(
            c(
                "cache_gets",
                "Calls of cached functions (and explicit gets) by result, each counted "
                "once: hit, miss (computed), stale, coalesced (got the value another "
                "caller computed), local_hit (served by the local tier). A cached None "
                "is a hit.",
                ("cache", "result"),
            )
        )
        self._puts = _Family(c("cache_puts", "Entries written.", ("cache",)))
        self._removals = _Family(
            c("cache_removals", "Entries deleted (those that existed).", ("cache",))
        )
        self._loads = _Family(
            h(
                "cache_load_duration_seconds",
                "Time spent computing values on a miss or refresh.",
                ("cache", "result"),
                buckets=LOAD_BUCKETS,
            )
        )
        self._errors = _Family(
            c(
                "cache_errors",
                "Cache operations that failed or were bypassed, by exception class.",
                ("cache", "operation", "error"),
            )
        )
        self._breaker = _Family(
            # livemax: one live process with a tripped breaker shows; dead processes
            # drop out on mark_process_dead. "all"/"liveall" would add a pid label.
            g(
                "cache_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open (multiprocess: the "
                "highest among live processes).",
                ("cache",),
                multiprocess_mode="livemax",
            )
        )
        self._acquires = _Family(
            c(
                "lock_acquires",
                "Lock acquisition attempts by result.",
                ("lock", "result"),
            )
        )
        self._waits = _Family(
            h(
                "lock_wait_seconds",
                "Time spent waiting to acquire a lock.",
                ("lock",),
                buckets=LOCK_BUCKETS,
            )
        )
        self._held = _Family(
            h(
                "lock_held_seconds",
                "Time a lock was held, from acquisition to release or loss.",
                ("lock",),
                buckets=LOCK_BUCKETS,
            )
        )
        self._releases = _Family(
            c(
                "lock_releases",
                "Lock releases; not_owned: the lock had expired or been taken over; "
                "unconfirmed: sent, but the replies were lost.",
                ("lock", "result"),
            )
        )
        self._renewals = _Family(
            c("lock_renewals", "Lock lease renewals by result.", ("lock", "result"))
        )
        self._eviction_risk = _Family(
            c(
                "lock_eviction_risk",
                "Lock servers found with a maxmemory-policy that can evict held locks "
                "(checked once per Cache and process when locks are first used).",
                ("policy",),
            )
        )
        self._local_invalidations = _Family(
            c(
                "local_invalidations",
                "Invalidated Redis keys the local tier received (CLIENT TRACKING).",
                ("cache",),
            )
        )
        self._local_flushes = _Family(
            c(
                "local_flushes",
                "Times the local tier was emptied, by reason: disconnect (listener "
                "lost: restart, kill, network), reconnect, flushall, fork, clear, "
                "topology (Redis Cluster slot map changed).",
                ("cache", "reason"),
            )
        )
        self._local_entries = _Family(
            g(
                "local_entries",
                "Entries held by the local tier (multiprocess: summed over live "
                "processes).",
                ("cache",),
                multiprocess_mode="livesum",
            )
        )
        self._locks_held = _Family(
            g(
                "locks_held",
                "Locks currently held (multiprocess: summed over live processes).",
                ("lock",),
                multiprocess_mode="livesum",
            )
        )
        # fmt: on

    def __repr__(self) -> str:
        return f"PrometheusMetrics(namespace={self.namespace!r})"

    # -- collectors for integrations ---------------------------------------------------

    def _register(
        self,
        kind: type[_C],
        name: str,
        labelnames: Sequence[str],
        make: Callable[[], _C],
    ) -> _C:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(f"metric names are Prometheus names, got {name!r}")
        with self._lock:
            existing = self._own.get(name)
            if existing is not None:
                # Idempotent for integrations that install twice (same type and labels).
                if type(existing) is kind and tuple(existing._labelnames) == tuple(
                    labelnames
                ):
                    return existing
                raise ConfigurationError(
                    f"{self.namespace}_{name} already exists as a "
                    f"{type(existing).__name__} with labels {existing._labelnames}"
                )
            try:
                collector = make()
            except ValueError as exc:  # DuplicateTimeseries is a ValueError
                raise ConfigurationError(
                    f"cannot register {self.namespace}_{name}: {exc}. Create one "
                    "PrometheusMetrics per registry and pass it to every Cache, or "
                    "give each its own registry=CollectorRegistry()"
                ) from None
            self._own[name] = collector
            return collector

    def counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> Counter:
        """A ``Counter`` named ``{namespace}_{name}`` in :attr:`registry` (``_total`` is
        added on exposition). Calling again with the same name and labels returns the
        same counter.

        Example: ``metrics.counter("celery_dedup", "Dedup decisions.", ("task",
        "result"))`` exposes ``rcache_celery_dedup_total``.
        """
        return self._register(
            Counter,
            name,
            labelnames,
            lambda: Counter(
                name, documentation, tuple(labelnames),
                namespace=self.namespace, registry=self.registry,
            ),
        )  # fmt: skip

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = LOAD_BUCKETS,
    ) -> Histogram:
        """A ``Histogram`` named ``{namespace}_{name}`` (end it in ``_seconds``)."""
        return self._register(
            Histogram,
            name,
            labelnames,
            lambda: Histogram(
                name, documentation, tuple(labelnames), namespace=self.namespace,
                registry=self.registry, buckets=tuple(buckets),
            ),
        )  # fmt: skip

    def gauge(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        multiprocess_mode: MultiprocessMode,
    ) -> Gauge:
        """A ``Gauge`` named ``{namespace}_{name}``.

        ``multiprocess_mode`` is required: how values of several processes combine
        under ``PROMETHEUS_MULTIPROC_DIR`` (``"livesum"``, ``"max"``,
        ``"mostrecent"``...); client_python's default ``"all"`` adds a ``pid`` label,
        which rcache never wants.
        """
        return self._register(
            Gauge,
            name,
            labelnames,
            lambda: Gauge(
                name, documentation, tuple(labelnames), namespace=self.namespace,
                registry=self.registry, multiprocess_mode=multiprocess_mode,
            ),
        )  # fmt: skip

    # -- MetricsSink: caches ----------------------------------------------------------

    def register_cache(self, cache: str) -> None:
        """Create the series of ``cache`` at zero (called when a cache or a cached
        function is created)."""
        if ("cache", cache) in self._registered:
            return
        self._registered.add(("cache", cache))
        if self._breaker_cache is None:
            # Cache.__init__ registers its own name before any function: the breaker
            # belongs to that name (see breaker_state).
            self._breaker_cache = cache
            self._breaker.child(cache).set(0)
        for result in GET_RESULTS:
            self._gets.child(cache, result)
        for result in LOAD_RESULTS:
            self._loads.child(cache, result)
        self._puts.child(cache)
        self._removals.child(cache)

    def cache_get(self, cache: str, result: str) -> None:
        # The hot path of every cached call: one dict lookup, then the child's inc().
        child = self._gets.children.get((cache, result))
        if child is None:
            child = self._gets.child(cache, result)
        child.inc()

    def cache_put(self, cache: str) -> None:
        self._puts.child(cache).inc()

    def cache_removal(self, cache: str) -> None:
        self._removals.child(cache).inc()

    def cache_load(self, cache: str, result: str, seconds: float) -> None:
        self._loads.child(cache, result).observe(seconds)

    def cache_error(self, cache: str, operation: str, error: str) -> None:
        self._errors.child(cache, operation, error).inc()

    def cache_bypassed(self, cache: str, result: str, seconds: float) -> None:
        self._errors.child(cache, "get", "CircuitOpen").inc()
        self.cache_get(cache, "miss")
        self._loads.child(cache, result).observe(seconds)

    def breaker_state(self, state: int, cache: str | None = None) -> None:
        """Record the circuit breaker state (0 closed, 1 open, 2 half-open).

        ``cache`` defaults to the first name registered with this sink, which is the
        name of the first ``Cache`` created with it.
        """
        name = cache if cache is not None else (self._breaker_cache or "default")
        self._breaker.child(name).set(state)

    # -- MetricsSink: locks -----------------------------------------------------------

    def register_lock(self, lock: str) -> None:
        """Create the series of lock name ``lock`` at zero."""
        if ("lock", lock) in self._registered:
            return
        self._registered.add(("lock", lock))
        for result in ACQUIRE_RESULTS:
            self._acquires.child(lock, result)
        for result in RELEASE_RESULTS:
            self._releases.child(lock, result)
        for result in RENEWAL_RESULTS:
            self._renewals.child(lock, result)
        self._waits.child(lock)
        self._held.child(lock)
        self._locks_held.child(lock)

    def lock_acquire(self, lock: str, result: str) -> None:
        self._acquires.child(lock, result).inc()

    def lock_wait(self, lock: str, seconds: float) -> None:
        self._waits.child(lock).observe(seconds)

    def lock_held(self, lock: str, seconds: float) -> None:
        self._held.child(lock).observe(seconds)

    def lock_release(self, lock: str, result: str) -> None:
        self._releases.child(lock, result).inc()

    def lock_renewal(self, lock: str, result: str) -> None:
        self._renewals.child(lock, result).inc()

    def locks_held_change(self, lock: str, delta: int) -> None:
        self._locks_held.child(lock).inc(delta)

    def lock_eviction_risk(self, policy: str) -> None:
        self._eviction_risk.child(policy).inc()

    # -- MetricsSink: the local tier ----------------------------------------------------

    def local_invalidations(self, cache: str, keys: int) -> None:
        self._local_invalidations.child(cache).inc(keys)

    def local_flush(self, cache: str, reason: str) -> None:
        self._local_flushes.child(cache, reason).inc()

    def local_entries(self, cache: str, entries: int) -> None:
        self._local_entries.child(cache).set(entries)


class _Family:
    """A collector and its label children, cached: ``metric.labels(...)`` takes a lock
    and str()s every value (about a microsecond); a dict lookup is a tenth of that."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Counter | Gauge | Histogram) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, *labels: str) -> Any:
        child = self.children.get(labels)
        if child is None:
            # Two threads may both create it: labels() returns the same child to both.
            child = self.children[labels] = self.metric.labels(*labels)
        return child


# -- exposition ------------------------------------------------------------------------


def export_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry an exporter should serve.

    Under ``PROMETHEUS_MULTIPROC_DIR``: a fresh registry whose only collector is a
    ``MultiProcessCollector`` over that directory, i.e. the sum over every process
    (``registry`` is then not used: in-process registries hold one process's share).
    Otherwise ``registry``, defaulting to ``prometheus_client.REGISTRY``.

    :raises ConfigurationError: ``PROMETHEUS_MULTIPROC_DIR`` is not a directory.
    """
    path = multiprocess_dir()
    if path is None:
        return REGISTRY if registry is None else registry
    if not Path(path).is_dir():
        raise ConfigurationError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a directory: create it (empty) "
            "before starting the server"
        )
    try:
        fresh = CollectorRegistry(support_collectors_without_names=True)
    except TypeError:  # pragma: no cover - prometheus-client < 0.21
        fresh = CollectorRegistry()
    MultiProcessCollector(fresh, path=path)  # type: ignore[no-untyped-call]
    return fresh


def make_wsgi_app(
    registry: CollectorRegistry | None = None, *, disable_compression: bool = False
) -> Callable[..., Any]:
    """A WSGI app serving the metrics (multiprocess-aware, see :func:`export_registry`).

    Flask: ``app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics":
    make_wsgi_app()})``.
    """
    app: Callable[..., Any] = prometheus_client.make_wsgi_app(
        export_registry(registry), disable_compression
    )
    return app


def make_asgi_app(
    registry: CollectorRegistry | None = None, *, disable_compression: bool = False
) -> Callable[..., Any]:
    """An ASGI app serving the metrics (multiprocess-aware: :func:`export_registry`).

    Any path answers. FastAPI/Starlette: ``app.add_route("/metrics",
    make_asgi_app())`` answers ``GET /metrics`` directly (``/metrics/`` redirects
    there). ``app.mount("/metrics", ...)`` would answer ``/metrics`` with a 307
    redirect to ``/metrics/``: Starlette matches a mount only below its path.

    The app is an object, not a function: Starlette's ``add_route`` treats a function
    as a ``handler(request)`` and anything else as an ASGI app.
    """
    return _ASGIApp(
        prometheus_client.make_asgi_app(export_registry(registry), disable_compression)
    )


class _ASGIApp:
    __slots__ = ("_app",)

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return "<rcache.metrics ASGI app>"


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop a dead process's live gauges (``rcache_locks_held``, breaker state).

    Call it from gunicorn's ``child_exit`` hook; counters and histograms of the dead
    process stay (they are part of the totals).
    """
    _mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class MetricsServer:
    """A running ``/metrics`` HTTP server (from :func:`start_http_server`)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])
        self.tls = isinstance(server.socket, ssl.SSLSocket)

    @property
    def url(self) -> str:
        """The scrape URL, ``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_http_server(
    port: int,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    client_cafile: str | None = None,
    client_capath: str | None = None,
    client_auth_required: bool = False,
    tls_min_version: ssl.TLSVersion | None = None,
) -> MetricsServer:
    """Serve the metrics over HTTP(S) from a daemon thread; any path answers.

    prometheus_client's own ``start_http_server`` does the serving (TLS and client
    certificates included); this wrapper adds what it lacks for rcache: the
    multiprocess-aware registry (:func:`export_registry`), a loopback default address
    (prometheus_client binds ``0.0.0.0``) and a handle to stop it.

    Under ``PROMETHEUS_MULTIPROC_DIR`` start it in exactly one process (gunicorn: a
    separate process or the app's own ``/metrics`` route; Celery prefork: the
    MainProcess, in ``worker_init``).

    :param port: TCP port; 0 picks a free one (read it from ``.port``).
    :param addr: address to bind; loopback by default, ``"0.0.0.0"`` to expose it.
    :param registry: what to serve outside multiprocess mode (default
        ``prometheus_client.REGISTRY``).
    :param certfile: with ``keyfile``, serve HTTPS with this certificate chain.
    :param client_cafile: ``client_capath``, ``client_auth_required``: verify client
        certificates (mutual TLS) against these CAs; ``tls_min_version`` e.g.
        ``ssl.TLSVersion.TLSv1_3`` (prometheus-client >= 0.21).
    :returns: a :class:`MetricsServer`; ``.close()`` stops it, ``.url`` is its URL.
    :raises ConfigurationError: only one of ``certfile``/``keyfile`` given.
    """
    if (certfile is None) != (keyfile is None):
        raise ConfigurationError(
            "HTTPS needs both certfile= and keyfile= (the certificate and its key)"
        )
    tls: dict[str, Any] = {}
    if tls_min_version is not None:
        tls["tls_min_version"] = tls_min_version
    server, thread = prometheus_client.start_http_server(
        port,
        addr,
        export_registry(registry),
        certfile=certfile,
        keyfile=keyfile,
        client_cafile=client_cafile,
        client_capath=client_capath,
        client_auth_required=client_auth_required,
        **tls,
    )
    # prometheus-client >= 0.20 returns (server, thread); stopping needs both
    return MetricsServer(server, thread)
