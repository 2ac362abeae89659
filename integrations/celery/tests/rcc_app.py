"""The Celery app the rcache-celery tests run in real prefork workers.

The worker subprocesses import it with ``celery -A rcc_app worker``; the Redis server
comes from ``$RCC_REDIS`` (``redis://127.0.0.1:<port>``, started by the tests). Broker:
db ``$RCC_BROKER_DB`` (default 0), results: db 1, cache and test counters: db 2. Task
bodies count their executions with INCR so tests can assert "exactly once". With
``$RCC_CACHE_URL`` (a ``redis+cluster://`` URL) the rcache Cache, and so every guard
key, lives there instead; the counters stay in db 2.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

import rcache
import rcache_celery

URL = os.environ["RCC_REDIS"].rstrip("/")


def counters() -> redis.Redis:
    return redis.Redis.from_url(f"{URL}/2", socket_timeout=10)


def _wait_gate(r: redis.Redis, token: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not r.exists(f"gate:{token}") and time.monotonic() < deadline:
        time.sleep(0.01)


def build(
    broker_db: int,
    visibility_timeout: float | None = None,
    cache_url: str | None = None,
) -> SimpleNamespace:
    app = Celery("rcc", broker=f"{URL}/{broker_db}", backend=f"{URL}/1")
    transport: dict[str, Any] = {}
    if visibility_timeout is not None:
        # Scan for expired unacked messages every second (kombu's default period is
        # about 100 s), so a short visibility timeout really redelivers.
        transport.update(
            visibility_timeout=visibility_timeout,
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
        )
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
        worker_send_task_events=False,
    )
    metrics = None
    if os.environ.get("RCC_METRICS_PORT"):
        # Worker A runs with PROMETHEUS_MULTIPROC_DIR set and one exporter in its
        # main process, as the README tells users to.
        from prometheus_client import CollectorRegistry

        from rcache.metrics import PrometheusMetrics

        metrics = PrometheusMetrics(registry=CollectorRegistry())
        rcache_celery.serve_metrics(app, port=int(os.environ["RCC_METRICS_PORT"]))
    cache = rcache.Cache(cache_url or f"{URL}/2", prefix="rcc", metrics=metrics)
    rcache_celery.install(app, cache)
    r = counters()
    U = rcache_celery.UniqueTask
    L = rcache_celery.LockedTask

    @app.task(base=U, name="rcc.unique", unique_on=["token"], lock_ttl=3, shared=False)
    def unique(token: str, payload: int = 0) -> str:
        r.incr(f"runs:{token}")
        _wait_gate(r, token)
        return token

    @app.task(base=U, name="rcc.quick", lock_ttl=3, shared=False)
    def quick(token: str) -> int:
        return int(r.incr(f"runs:{token}"))

    @app.task(base=U, name="rcc.suicide", lock_ttl=30, shared=False)
    def suicide(token: str) -> None:
        r.incr(f"runs:{token}")
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(base=U, name="rcc.slow", lock_ttl=30, shared=False)
    def slow(token: str, seconds: float) -> None:
        r.incr(f"runs:{token}")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)

    @app.task(base=U, name="rcc.limited", lock_ttl=30, time_limit=1, shared=False)
    def limited(token: str) -> None:
        r.incr(f"runs:{token}")
        time.sleep(30)

    @app.task(base=U, name="rcc.retrying", bind=True, lock_ttl=3, shared=False)
    def retrying(self: Any, token: str, times: int) -> int:
        n = int(r.incr(f"runs:{token}"))
        r.rpush(f"ids:{token}", self.request.id)
        if n <= times:
            raise self.retry(countdown=0.3, max_retries=times + 1)
        return n

    @app.task(
        base=U,
        name="rcc.autoretrying",
        lock_ttl=3,
        autoretry_for=(ValueError,),
        retry_kwargs={"countdown": 0.3, "max_retries": 5},
        shared=False,
    )
    def autoretrying(token: str, times: int) -> int:
        n = int(r.incr(f"runs:{token}"))
        if n <= times:
            raise ValueError(n)
        return n

    @app.task(
        base=U,
        name="rcc.requeued",
        lock_ttl=30,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def requeued(token: str) -> int:
        n = int(r.incr(f"runs:{token}"))
        if n == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    @app.task(
        base=L,
        name="rcc.fenced",
        lock_key="fence:{token}",
        lock_ttl=5,
        on_locked="retry",
        lock_retry_delay=0.05,
        max_retries=None,
        shared=False,
    )
    def fenced(token: str, i: int) -> int:
        # A non-atomic read-modify-write: two overlapping runs lose an update.
        active = int(r.incr(f"active:{token}"))
        if active > 1:
            r.incr(f"overlap:{token}")
        value = int(r.get(f"fence:{token}") or 0)
        time.sleep(0.01)
        r.set(f"fence:{token}", value + 1)
        r.decr(f"active:{token}")
        r.incr(f"runs:{token}")
        return i

    @app.task(
        base=L,
        name="rcc.locked_skip",
        lock_key="skip:{token}",
        on_locked="skip",
        shared=False,
    )
    def locked_skip(token: str) -> None:
        r.incr(f"runs:{token}")
        _wait_gate(r, token)

    @app.task(
        base=L,
        name="rcc.locked_wait",
        lock_key="wait:{token}",
        on_locked="wait",
        lock_wait_timeout=20,
        shared=False,
    )
    def locked_wait(token: str, i: int) -> int:
        r.incr(f"runs:{token}")
        _wait_gate(r, token)
        return i

    @app.task(
        base=L,
        name="rcc.locked_fail",
        lock_key="wait:{token}",
        on_locked="fail",
        shared=False,
    )
    def locked_fail(token: str) -> None:
        r.incr(f"runs:{token}")

    @app.task(base=U, name="rcc.add", shared=False)
    def add(x: int, y: int) -> int:
        r.incr(f"runs:add:{x}:{y}")
        return x + y

    @app.task(name="rcc.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @cache.cached(ttl=3)
    def top_products(category: str) -> list[Any]:
        n = int(r.incr(f"computed:{category}"))
        return [category, n]

    warm_task = rcache_celery.warm(
        app, top_products, every=1, jitter=0.2, args=[("books",), ("games",)]
    )

    return SimpleNamespace(
        app=app,
        cache=cache,
        unique=unique,
        quick=quick,
        suicide=suicide,
        slow=slow,
        limited=limited,
        retrying=retrying,
        autoretrying=autoretrying,
        requeued=requeued,
        fenced=fenced,
        locked_skip=locked_skip,
        locked_wait=locked_wait,
        locked_fail=locked_fail,
        add=add,
        tsum=tsum,
        top_products=top_products,
        warm_task=warm_task,
    )


_vt = os.environ.get("RCC_VT")
ns = build(
    int(os.environ.get("RCC_BROKER_DB", "0")),
    float(_vt) if _vt else None,
    os.environ.get("RCC_CACHE_URL"),
)
app = ns.app
