"""Warming through real beat processes; metrics; the lease watchdog."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry
from rcc_helpers import Worker, eventually, log_has, runs

import rcache
import rcache_celery
from rcache.testing import RedisServer
from rcache_celery import _guard

pytestmark = pytest.mark.slow


def test_two_beats_warm_before_expiry_without_double_compute(
    ns: SimpleNamespace,
    worker: Any,
    celery_redis: RedisServer,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    """Entries have ttl=3 s, warm(every=1 s): with two `celery beat` processes (as
    with a beat next to a `worker -B`), the entries never expire and are computed about
    once per period, not twice."""
    keys = [ns.top_products.key_for(c) for c in ("books", "games")]
    beats = [
        Worker(
            f"beat{i}", celery_redis, tmp_path, ["beat", "-s", str(tmp_path / f"s{i}")]
        )
        for i in range(2)
    ]
    try:
        eventually(lambda: all(r.exists(k) for k in keys), 60, "first warm run")
        first = {c: int(r.get(f"computed:{c}") or 0) for c in ("books", "games")}
        start = time.monotonic()
        window = 4.0
        while time.monotonic() - start < window:  # a negative check over a window
            assert all(r.pttl(k) > 0 for k in keys), "a warmed entry expired"
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        for c in ("books", "games"):
            done = int(r.get(f"computed:{c}") or 0) - first[c]
            assert 2 <= done <= elapsed / 1.0 + 2, (c, done)
        assert ns.top_products("books")[0] == "books"  # served from the cache
    finally:
        for b in beats:
            b.stop()


def test_warm_rejects_a_period_not_shorter_than_the_ttl(ns: SimpleNamespace) -> None:
    with pytest.raises(rcache.ConfigurationError, match="expire"):
        rcache_celery.warm(ns.app, ns.top_products, every=3)
    with pytest.raises(rcache.ConfigurationError, match="cached"):
        rcache_celery.warm(ns.app, len, every=1)


def test_dedup_metrics_on_the_cache_registry(celery_redis: RedisServer) -> None:
    """Counted where apply_async runs; collectors appear at install(), not import."""
    from rcache.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    cache = rcache.Cache(
        f"redis://127.0.0.1:{celery_redis.port}/2",
        prefix="m" + uuid.uuid4().hex[:6],
        metrics=PrometheusMetrics(registry=registry),
    )
    # Broker db 5: no worker consumes it, the messages just sit there.
    app = Celery("m", broker=f"redis://127.0.0.1:{celery_redis.port}/5")
    assert registry.get_sample_value("rcache_celery_dedup_total", {}) is None
    rcache_celery.install(app, cache)
    rcache_celery.install(app, cache)  # idempotent

    @app.task(base=rcache_celery.UniqueTask, name="m.job", shared=False)
    def job(x: int) -> int:
        return x

    a, b, c = job.delay(1), job.delay(1), job.delay(2)
    assert a.id == b.id != c.id

    def value(result: str) -> float | None:
        return registry.get_sample_value(
            "rcache_celery_dedup_total", {"task": "m.job", "result": result}
        )

    assert value("enqueued") == 2
    assert value("duplicate") == 1
    with pytest.raises(rcache.ConfigurationError):
        rcache_celery.install(
            app, rcache.Cache(f"redis://127.0.0.1:{celery_redis.port}/2")
        )
    rcache_celery.uninstall(app)
    rcache_celery.uninstall(app)  # idempotent
    with pytest.raises(rcache.ConfigurationError, match="install"):
        job.delay(1)  # fails closed: no silent duplicates
    app.close()


def test_watchdog_renews_and_an_abandoned_lease_expires(
    celery_redis: RedisServer,
) -> None:
    """If every release hook is lost, the key expires within one lease (plus the
    renewal period), instead of one hour (celery-once #147) or never."""
    cache = rcache.Cache(f"redis://127.0.0.1:{celery_redis.port}/2", prefix="wd")
    guard = _guard.Guard(cache, "wd:celery:l:{" + uuid.uuid4().hex + "}", "task-1")
    lease = 0.6
    assert _guard.begin(guard, lease, acquire=True)[0] == _guard.ACQUIRED
    renewer = _guard.renewer()
    handle = renewer.add(guard, lease, "wd")
    client = celery_redis.client(db=2)
    try:
        deadline = time.monotonic() + 3 * lease
        while time.monotonic() < deadline:  # renewed past several leases
            assert client.get(guard.key) == b"task-1"
            time.sleep(0.02)
        # Another owner's key is never extended nor deleted by a stale renewer.
        other = _guard.Guard(cache, guard.key, "task-2")
        assert _guard.begin(other, lease, acquire=True)[0] == _guard.HELD
        assert renewer.remove(handle) is False  # lease was never lost
        renewals = cache.metrics.count("lock_renewals", "wd", "renewed")  # type: ignore[attr-defined]
        assert renewals >= 3
        abandoned = time.monotonic()
        eventually(lambda: not client.exists(guard.key), 5, "lease expiry")
        assert time.monotonic() - abandoned <= lease + 0.3
        assert _guard.finish(guard, "done", 5) is False  # compare-and-act: not owner
        assert _guard.begin(other, lease, acquire=True)[0] == _guard.ACQUIRED
        assert _guard.renew_once(guard, lease) is False
        assert client.get(guard.key) == b"task-2"
    finally:
        client.close()


def test_worker_exporter_sums_children_and_main_process(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    """One exporter in the worker's main process (PROMETHEUS_MULTIPROC_DIR): counts
    from the pool children (a bypass ignored) and from the main process (a recovery
    after SIGKILL) both appear, exactly."""
    bypass = ("rcache_celery_runtime_duplicates_total",
              (("reason", "bypassed_apply"), ("task", "rcc.unique")))  # fmt: skip
    lost = ("rcache_celery_lock_recoveries_total",
            (("reason", "worker_lost"), ("task", "rcc.suicide")))  # fmt: skip
    before = eventually(worker.metrics, 20, "the exporter")
    first = ns.unique.delay(token)
    eventually(lambda: runs(r, token) == 1, message="first run")
    for _ in range(2):
        copy = ns.app.send_task("rcc.unique", args=[token])
        assert log_has(worker, f"ignored rcc.unique[{copy.id}]")
    r.set(f"gate:{token}", 1)
    first.get(timeout=20)
    ns.suicide.delay(token + "-k")
    eventually(
        lambda: worker.metrics().get(lost, 0) == before.get(lost, 0) + 1,
        message="recovery counted",
    )
    after = worker.metrics()
    assert after[bypass] - before.get(bypass, 0) == 2
    # LockedTask outcomes, counted in the children: one ran, one skipped.
    lock_token = token + "-lock"
    holder = ns.locked_skip.delay(lock_token)
    eventually(lambda: runs(r, lock_token) == 1, message="lock holder runs")
    skipped = ns.locked_skip.delay(lock_token)
    assert log_has(worker, f"rcc.locked_skip[{skipped.id}] found")
    r.set(f"gate:{lock_token}", 1)
    holder.get(timeout=20)

    def locked(action: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("rcache_celery_locked_total",
                (("action", action), ("task", "rcc.locked_skip")))  # fmt: skip

    final = worker.metrics()
    for action in ("ran", "skipped"):
        assert final[locked(action)] - before.get(locked(action), 0) == 1
