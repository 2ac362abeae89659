"""Prometheus metrics end to end: real Redis traffic, a real /metrics endpoint, exact values.

Every test gets its own ``CollectorRegistry`` and scrapes it over HTTP (``start_http_server``
on port 0, or the WSGI app behind a real ``wsgiref`` server), then parses the exposition
with prometheus_client's parser, so the assertions are about what Prometheus would see.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import rcache
from rcache import BreakerPolicy, ConfigurationError, LockNotOwnedError, RetryPolicy
from rcache.metrics import (
    LOAD_BUCKETS,
    MetricsServer,
    PrometheusMetrics,
    make_asgi_app,
    make_wsgi_app,
    start_http_server,
)
from rcache.testing import RedisServer, wait_until


class Scrape:
    """One scrape of an endpoint: ``value(name, **labels)`` of a sample, exactly."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            raise AssertionError(
                f"no sample {name}{labels} in the scrape:\n{self.text}"
            )
        return self.samples[key]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(response.read().decode())


@pytest.fixture
def metrics() -> PrometheusMetrics:
    return PrometheusMetrics(registry=CollectorRegistry())


@pytest.fixture
def endpoint(
    metrics: PrometheusMetrics, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MetricsServer]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with start_http_server(0, registry=metrics.registry) as server:
        yield server


@pytest.fixture
def pcache(redis_url: str, metrics: PrometheusMetrics) -> Iterator[rcache.Cache]:
    c = rcache.Cache(redis_url, prefix="mtest", name="shop", metrics=metrics)
    yield c
    c.close()


def test_series_exist_at_zero_from_decoration(
    pcache: rcache.Cache, endpoint: MetricsServer
) -> None:
    @pcache.cached(ttl=60, name="users.get")
    def get_user(user_id: int) -> int:
        return user_id

    s = scrape(endpoint.url)
    for cache in ("shop", "users.get"):
        for result in ("hit", "miss", "stale"):
            assert s.value("rcache_cache_gets_total", cache=cache, result=result) == 0
        assert s.value("rcache_cache_puts_total", cache=cache) == 0
        assert s.value("rcache_cache_removals_total", cache=cache) == 0
        for result in ("success", "failure"):
            assert (
                s.value(
                    "rcache_cache_load_duration_seconds_count",
                    cache=cache,
                    result=result,
                )
                == 0
            )
    assert s.value("rcache_cache_breaker_state", cache="shop") == 0
    # The breaker belongs to the Cache, not to each function.
    assert s.series("rcache_cache_breaker_state") == [{"cache": "shop"}]


def test_sync_cached_and_explicit_traffic_exact(
    pcache: rcache.Cache, endpoint: MetricsServer, redis_client: Any
) -> None:
    calls: list[int] = []

    @pcache.cached(ttl=60, name="users.get")
    def get_user(user_id: int) -> dict[str, int] | None:
        calls.append(user_id)
        return None if user_id == 0 else {"id": user_id}

    @pcache.cached(ttl=60, name="users.fail")
    def fail(user_id: int) -> int:
        raise ValueError(user_id)

    assert get_user(1) == {"id": 1}  # miss, load, put
    assert get_user(1) == {"id": 1}  # hit
    assert get_user(1) == {"id": 1}  # hit
    assert get_user(2) == {"id": 2}  # miss, load, put
    assert get_user(0) is None  # miss, load, put (None is cached)
    assert get_user(0) is None  # hit: a cached None is a hit
    assert get_user.invalidate(1) is True  # removal
    assert get_user.invalidate(1) is False  # nothing removed
    assert get_user(1) == {"id": 1}  # miss, load, put
    assert calls == [1, 2, 0, 1]
    for _ in range(2):
        with pytest.raises(ValueError):
            fail(7)  # miss, failed load, nothing stored

    assert pcache.get("a") is None  # miss
    assert pcache.set("a", 1, ttl=60) is True  # put
    assert pcache.get("a") == 1  # hit
    assert pcache.delete("a") is True  # removal
    assert pcache.delete("a") is False
    assert pcache.get("a", "dflt") == "dflt"  # miss

    s = scrape(endpoint.url)
    v = s.value
    assert v("rcache_cache_gets_total", cache="users.get", result="hit") == 3
    assert v("rcache_cache_gets_total", cache="users.get", result="miss") == 4
    assert v("rcache_cache_gets_total", cache="users.get", result="stale") == 0
    assert v("rcache_cache_puts_total", cache="users.get") == 4
    assert v("rcache_cache_removals_total", cache="users.get") == 1
    load = "rcache_cache_load_duration_seconds"
    assert v(f"{load}_count", cache="users.get", result="success") == 4
    assert v(f"{load}_count", cache="users.get", result="failure") == 0
    assert v(f"{load}_count", cache="users.fail", result="failure") == 2
    assert v("rcache_cache_gets_total", cache="users.fail", result="miss") == 2
    assert v("rcache_cache_puts_total", cache="users.fail") == 0
    assert v("rcache_cache_gets_total", cache="shop", result="hit") == 1
    assert v("rcache_cache_gets_total", cache="shop", result="miss") == 2
    assert v("rcache_cache_puts_total", cache="shop") == 1
    assert v("rcache_cache_removals_total", cache="shop") == 1
    # Loads of a trivial function land in the sub-millisecond buckets.
    assert LOAD_BUCKETS[0] == 0.0001
    assert v(f"{load}_bucket", cache="users.get", result="success", le="0.001") >= 1
    assert v(f"{load}_bucket", cache="users.get", result="success", le="+Inf") == 4
    assert s.series("rcache_cache_errors_total") == []
    # Labels are bounded: no key, argument or value anywhere in the exposition.
    keys = [k.decode() for k in redis_client.keys("*")]
    assert keys  # the traffic really reached this Redis
    for k in keys:
        assert k not in s.text
    assert "{'id'" not in s.text


async def test_async_cached_and_explicit_traffic_exact(
    redis_url: str, metrics: PrometheusMetrics, endpoint: MetricsServer
) -> None:
    c = rcache.Cache(redis_url, prefix="mtest", name="ashop", metrics=metrics)
    try:

        @c.cached(ttl=60, name="aitems")
        async def item(item_id: int) -> int:
            await asyncio.sleep(0)
            return item_id * 10

        assert await item(1) == 10  # miss
        assert await item(1) == 10  # hit
        assert await item(2) == 20  # miss
        assert await item(2) == 20  # hit
        assert await item(2) == 20  # hit
        assert await item.invalidate(2) is True
        assert await c.aget("k") is None  # miss
        assert await c.aset("k", [1, 2], ttl=30) is True
        assert await c.aget("k") == [1, 2]  # hit
        assert await c.adelete("k") is True

        s = await asyncio.to_thread(scrape, endpoint.url)
        v = s.value
        assert v("rcache_cache_gets_total", cache="aitems", result="hit") == 3
        assert v("rcache_cache_gets_total", cache="aitems", result="miss") == 2
        assert v("rcache_cache_puts_total", cache="aitems") == 2
        assert v("rcache_cache_removals_total", cache="aitems") == 1
        assert (
            v(
                "rcache_cache_load_duration_seconds_count",
                cache="aitems",
                result="success",
            )
            == 2
        )
        assert v("rcache_cache_gets_total", cache="ashop", result="hit") == 1
        assert v("rcache_cache_gets_total", cache="ashop", result="miss") == 1
        assert v("rcache_cache_puts_total", cache="ashop") == 1
        assert v("rcache_cache_removals_total", cache="ashop") == 1
    finally:
        await c.aclose()
        c.close()


def test_backend_errors_and_breaker_state(
    redis_server_factory: Callable[[], RedisServer],
    metrics: PrometheusMetrics,
    endpoint: MetricsServer,
) -> None:
    server = redis_server_factory()
    c = rcache.Cache(
        server.url,
        prefix="mtest",
        name="flaky",
        metrics=metrics,
        retry=RetryPolicy(attempts=1),
        breaker=BreakerPolicy(failures=2, reset_after=30),
        redis_options={"socket_connect_timeout": 1, "socket_timeout": 1},
    )
    try:

        @c.cached(ttl=60, name="flaky.fn")
        def fn(x: int) -> int:
            return x + 1

        assert fn(1) == 2  # miss against a live server, stored
        assert fn(1) == 2  # hit
        server.kill()
        for _ in range(3):
            # The first two reach the dead server (connection refused) and open the
            # breaker; the third is skipped by the open breaker. All run the function.
            assert fn(1) == 2
        s = scrape(endpoint.url)
        errors = {
            (d["operation"], d["error"]): s.value("rcache_cache_errors_total", **d)
            for d in s.series("rcache_cache_errors_total")
        }
        assert errors == {("get", "ConnectionError"): 2, ("get", "CircuitOpen"): 1}
        assert all(
            d["cache"] == "flaky.fn" for d in s.series("rcache_cache_errors_total")
        )
        assert s.value("rcache_cache_breaker_state", cache="flaky") == 1
        assert s.value("rcache_cache_gets_total", cache="flaky.fn", result="miss") == 4
        assert s.value("rcache_cache_gets_total", cache="flaky.fn", result="hit") == 1
        # Bypassed calls still count their loads, but store nothing.
        assert (
            s.value(
                "rcache_cache_load_duration_seconds_count",
                cache="flaky.fn",
                result="success",
            )
            == 4
        )
        assert s.value("rcache_cache_puts_total", cache="flaky.fn") == 1
    finally:
        c.close()


def test_lock_metrics_exact_through_the_sink(
    metrics: PrometheusMetrics, endpoint: MetricsServer
) -> None:
    # Drives the MetricsSink lock methods in the order a lock reports them.
    metrics.register_lock("orders")
    metrics.register_lock("idle")
    for _ in range(2):
        metrics.lock_acquire("orders", "acquired")
        metrics.locks_held_change("orders", 1)
    metrics.lock_acquire("orders", "busy")
    metrics.lock_acquire("orders", "timeout")
    metrics.lock_wait("orders", 0.002)
    metrics.lock_wait("orders", 0.4)
    for _ in range(3):
        metrics.lock_renewal("orders", "renewed")
    metrics.lock_renewal("orders", "lost")
    metrics.lock_held("orders", 1.5)
    metrics.lock_release("orders", "released")
    metrics.locks_held_change("orders", -1)
    metrics.lock_release("orders", "not_owned")

    s = scrape(endpoint.url)
    v = s.value
    acquires = {
        r: v("rcache_lock_acquires_total", lock="orders", result=r)
        for r in ("acquired", "busy", "timeout", "error")
    }
    assert acquires == {"acquired": 2, "busy": 1, "timeout": 1, "error": 0}
    assert v("rcache_lock_releases_total", lock="orders", result="released") == 1
    assert v("rcache_lock_releases_total", lock="orders", result="not_owned") == 1
    assert v("rcache_lock_renewals_total", lock="orders", result="renewed") == 3
    assert v("rcache_lock_renewals_total", lock="orders", result="lost") == 1
    assert v("rcache_locks_held", lock="orders") == 1
    assert v("rcache_lock_wait_seconds_count", lock="orders") == 2
    assert v("rcache_lock_wait_seconds_bucket", lock="orders", le="0.001") == 0
    assert v("rcache_lock_wait_seconds_bucket", lock="orders", le="0.005") == 1
    assert v("rcache_lock_wait_seconds_bucket", lock="orders", le="0.5") == 2
    assert v("rcache_lock_wait_seconds_sum", lock="orders") == pytest.approx(0.402)
    assert v("rcache_lock_held_seconds_count", lock="orders") == 1
    assert v("rcache_lock_held_seconds_bucket", lock="orders", le="1.0") == 0
    assert v("rcache_lock_held_seconds_bucket", lock="orders", le="2.5") == 1
    assert v("rcache_lock_held_seconds_bucket", lock="orders", le="600.0") == 1
    # A registered lock without traffic is exported at zero (rate() works at once).
    for r in ("acquired", "busy", "timeout", "error"):
        assert v("rcache_lock_acquires_total", lock="idle", result=r) == 0
    assert v("rcache_lock_renewals_total", lock="idle", result="lost") == 0
    assert v("rcache_locks_held", lock="idle") == 0
    assert v("rcache_lock_wait_seconds_count", lock="idle") == 0


def test_cache_lock_traffic_exact(
    pcache: rcache.Cache, endpoint: MetricsServer, redis_client: Any
) -> None:
    lock = pcache.lock("jobs", ttl=10)
    other = pcache.lock("jobs", ttl=10)
    s0 = scrape(endpoint.url)  # registered when created: zero before any traffic
    assert s0.value("rcache_lock_acquires_total", lock="jobs", result="acquired") == 0
    with lock:
        mid = scrape(endpoint.url)
        assert mid.value("rcache_locks_held", lock="jobs") == 1
        assert other.acquire(timeout=0) is False  # busy: one try
        assert other.acquire(timeout=0.05) is False  # timeout: waited and gave up
    assert other.acquire(timeout=5) is True
    other.release()

    # A lease that runs out while held (no renewal): the release finds it gone.
    short = pcache.lock("jobs.short", ttl=0.2, auto_renew=False)
    assert short.acquire(timeout=0) is True
    wait_until(
        lambda: not redis_client.exists("mtest:l:{jobs.short}"),
        timeout=10,
        message="the short lease to expire in Redis",
    )
    with pytest.raises(LockNotOwnedError):
        short.release()

    s = scrape(endpoint.url)
    v = s.value
    acquires = {
        r: v("rcache_lock_acquires_total", lock="jobs", result=r)
        for r in ("acquired", "busy", "timeout", "error")
    }
    assert acquires == {"acquired": 2, "busy": 1, "timeout": 1, "error": 0}
    assert v("rcache_lock_releases_total", lock="jobs", result="released") == 2
    assert v("rcache_lock_releases_total", lock="jobs", result="not_owned") == 0
    assert v("rcache_lock_renewals_total", lock="jobs", result="lost") == 0
    assert v("rcache_locks_held", lock="jobs") == 0
    assert v("rcache_lock_held_seconds_count", lock="jobs") == 2
    assert v("rcache_lock_wait_seconds_count", lock="jobs") == 2
    assert v("rcache_lock_acquires_total", lock="jobs.short", result="acquired") == 1
    assert v("rcache_lock_releases_total", lock="jobs.short", result="not_owned") == 1
    assert v("rcache_lock_releases_total", lock="jobs.short", result="released") == 0
    # Counted once, whether the renewer's deadline watch or the release noticed first.
    assert v("rcache_lock_renewals_total", lock="jobs.short", result="lost") == 1
    assert v("rcache_locks_held", lock="jobs.short") == 0


def test_lock_renewals_counted(pcache: rcache.Cache, endpoint: MetricsServer) -> None:
    def renewed() -> float:
        return scrape(endpoint.url).value(
            "rcache_lock_renewals_total", lock="renewing", result="renewed"
        )

    with pcache.lock("renewing", ttl=0.3):  # auto-renewed every ttl/3 inside `with`
        wait_until(lambda: renewed() >= 2, timeout=10, message="two renewals")
    s = scrape(endpoint.url)
    count = s.value("rcache_lock_renewals_total", lock="renewing", result="renewed")
    assert count >= 2
    assert s.value("rcache_lock_renewals_total", lock="renewing", result="lost") == 0
    assert (
        s.value("rcache_lock_releases_total", lock="renewing", result="released") == 1
    )
    assert renewed() == count  # the renewer stopped with the release


async def test_async_lock_traffic_exact(
    redis_url: str, metrics: PrometheusMetrics, endpoint: MetricsServer
) -> None:
    c = rcache.Cache(redis_url, prefix="mtest", name="alocks", metrics=metrics)
    try:
        async with c.lock("ajobs", ttl=10):
            assert await c.lock("ajobs", ttl=10).aacquire(timeout=0) is False
        for _ in range(2):
            async with c.lock("ajobs", ttl=10):
                pass
        s = await asyncio.to_thread(scrape, endpoint.url)
        v = s.value
        assert v("rcache_lock_acquires_total", lock="ajobs", result="acquired") == 3
        assert v("rcache_lock_acquires_total", lock="ajobs", result="busy") == 1
        assert v("rcache_lock_releases_total", lock="ajobs", result="released") == 3
        assert v("rcache_locks_held", lock="ajobs") == 0
    finally:
        await c.aclose()
        c.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_wsgi_app_behind_a_real_http_server(
    pcache: rcache.Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    app = make_wsgi_app(pcache.metrics.registry)  # type: ignore[attr-defined]
    httpd: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        pcache.set("x", 1, ttl=10)
        pcache.get("x")
        s = scrape(f"http://127.0.0.1:{httpd.server_port}/metrics")
        assert s.value("rcache_cache_gets_total", cache="shop", result="hit") == 1
        assert s.value("rcache_cache_puts_total", cache="shop") == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def test_asgi_app_serves_the_registry(
    pcache: rcache.Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No ASGI server is installed in the dev environment: drive the ASGI protocol
    # directly, as a server would (one http.request in, response start + body out).
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = pcache.metrics.registry  # type: ignore[attr-defined]
    app = make_asgi_app(registry)
    await pcache.aset("y", 2, ttl=10)
    assert await pcache.aget("y") == 2
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "query_string": b"",
        "headers": [(b"accept", b"text/plain")],
    }
    await app(scope, receive, send)
    await pcache.aclose()
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    s = Scrape(sent[1]["body"].decode())
    assert s.value("rcache_cache_gets_total", cache="shop", result="hit") == 1
    assert s.value("rcache_cache_puts_total", cache="shop") == 1


def test_promtool_accepts_a_real_scrape(
    pcache: rcache.Cache, metrics: PrometheusMetrics, endpoint: MetricsServer
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("RCACHE_ALLOW_SKIP") == "1":
            pytest.skip("promtool not installed and RCACHE_ALLOW_SKIP=1")
        pytest.fail(
            "promtool is not on PATH: run ./scripts/test (it installs the Debian package "
            "'prometheus') or apt-get install prometheus",
            pytrace=False,
        )

    @pcache.cached(ttl=60, name="lint.fn")
    def fn(x: int) -> int:
        return x

    fn(1)
    fn(1)
    metrics.register_lock("lint.lock")
    metrics.lock_acquire("lint.lock", "acquired")
    metrics.cache_error("lint.fn", "get", "ConnectionError")
    with urllib.request.urlopen(endpoint.url, timeout=10) as response:
        body = response.read()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    # promtool prints lint problems (naming, units, HELP) and exits non-zero on them.
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"", result.stdout.decode()


def test_integration_collectors_share_the_registry(
    metrics: PrometheusMetrics, endpoint: MetricsServer
) -> None:
    dedup = metrics.counter("celery_dedup", "Dedup decisions.", ("task", "result"))
    assert (
        metrics.counter("celery_dedup", "Dedup decisions.", ("task", "result")) is dedup
    )
    dedup.labels("send_report", "duplicate").inc(3)
    ts = metrics.gauge(
        "warm_last_success_timestamp_seconds",
        "Last warm.",
        ("cache",),
        multiprocess_mode="max",
    )
    ts.labels("users").set(1700000000)
    h = metrics.histogram("warm_duration_seconds", "Warm time.", ("cache",))
    h.labels("users").observe(0.2)
    with pytest.raises(ConfigurationError, match="already exists"):
        metrics.gauge("celery_dedup", "x", ("task", "result"), multiprocess_mode="max")
    s = scrape(endpoint.url)
    assert (
        s.value("rcache_celery_dedup_total", task="send_report", result="duplicate")
        == 3
    )
    assert s.value("rcache_warm_last_success_timestamp_seconds", cache="users") == 1.7e9
    assert s.value("rcache_warm_duration_seconds_count", cache="users") == 1


def test_one_sink_per_registry_and_bad_namespace() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry=registry)
    with pytest.raises(ConfigurationError, match="one PrometheusMetrics per registry"):
        PrometheusMetrics(registry=registry)
    other = PrometheusMetrics(registry=registry, namespace="other")
    assert other.registry is registry
    with pytest.raises(ConfigurationError, match="namespace"):
        PrometheusMetrics(registry=CollectorRegistry(), namespace="bad-name")


def test_default_registry_is_the_global_one() -> None:
    from prometheus_client import REGISTRY

    m = PrometheusMetrics(namespace="rcache_default_registry_test")
    try:
        assert m.registry is REGISTRY
        assert m.counter("x", "x") is not None
    finally:
        for collector in list(m._own.values()):
            REGISTRY.unregister(collector)


def test_import_rcache_works_without_prometheus_client() -> None:
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "prometheus_client":
                    raise ImportError("blocked by the test")
                return None

        sys.meta_path.insert(0, Block())
        import rcache

        rcache.Cache("redis://127.0.0.1:1/0", prefix="x")
        assert "prometheus_client" not in sys.modules
        assert "rcache.metrics" not in sys.modules
        try:
            import rcache.metrics
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'rcache-redis[prometheus]'" in result.stdout


def test_exporter_refuses_a_missing_multiproc_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="is not a directory"):
        make_wsgi_app()
