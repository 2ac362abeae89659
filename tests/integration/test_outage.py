"""Redis dies mid-test: cached functions keep answering, the breaker opens, caching resumes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

import rcache
from rcache._breaker import CLOSED, OPEN
from rcache.testing import RedisServer, wait_until

FAST_BREAKER = rcache.BreakerPolicy(failures=2, reset_after=0.2, max_reset_after=0.4)


def make_cache(server: RedisServer, **kw: Any) -> rcache.Cache:
    return rcache.Cache(server.url, prefix="o", breaker=FAST_BREAKER, **kw)


def test_sync_outage_fails_open_and_recovers(
    redis_server_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory()
    cache = make_cache(server)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        calls.append(x)
        return x * 10

    assert f(1) == 10 and f(1) == 10
    assert calls == [1]

    server.kill()
    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        for _ in range(50):
            assert f(1) == 10  # the function still answers
    assert len(calls) == 51
    assert cache.breaker.state != CLOSED
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    name = f._spec.name  # type: ignore[attr-defined]
    failures = m.count("cache_errors", name, "get", "ConnectionError")
    skipped = m.count("cache_errors", name, "get", "CircuitOpen")
    assert failures == 2  # two real attempts opened the breaker ...
    assert skipped == 48  # ... and the other calls never touched the network
    # one warning per interval, not one per call
    per_call = [
        r for r in caplog.records if "carrying on without the cache" in r.getMessage()
    ]
    assert len(per_call) == 1
    assert any("unavailable" in r.getMessage() for r in caplog.records)

    server.restart()
    # the breaker probes by itself on a later call and closes; caching resumes
    wait_until(
        lambda: f(1) == 10 and cache.breaker.state == CLOSED,
        timeout=10,
        message="breaker to close after restart",
    )
    before = len(calls)
    assert f(2) == 20 and f(2) == 20
    assert len(calls) == before + 1  # cached again
    cache.close()


async def test_async_outage_fails_open_and_recovers(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = make_cache(server)
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        calls.append(x)
        return x * 10

    assert await f(1) == 10 and await f(1) == 10
    server.kill()
    for _ in range(20):
        assert await f(1) == 10
    assert len(calls) == 21
    assert cache.breaker.state == OPEN
    assert await cache.aget("anything", default="fallback") == "fallback"
    assert await cache.aset("k", 1, ttl=5) is False

    server.restart()

    async def healed() -> bool:
        return await f(3) == 30 and cache.breaker.state == CLOSED

    import asyncio
    import time

    deadline = time.monotonic() + 10
    while not await healed():
        assert time.monotonic() < deadline, "breaker did not close after restart"
        await asyncio.sleep(0.05)
    n = len(calls)
    assert await f(4) == 40 and await f(4) == 40
    assert len(calls) == n + 1
    await cache.aclose()


def test_raise_policy(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    cache = make_cache(server, on_backend_error="raise")

    @cache.cached(ttl=60)
    def f() -> int:
        return 1

    assert f() == 1
    server.kill()
    with pytest.raises(rcache.BackendUnavailableError) as info:
        f()
    assert isinstance(info.value, rcache.RCacheError)
    assert not type(info.value.original).__module__.startswith("rcache")
    with pytest.raises(rcache.BackendUnavailableError):
        cache.get("k")

    # per-decorator override back to bypass
    @cache.cached(ttl=60, on_backend_error="bypass")
    def g() -> int:
        return 2

    assert g() == 2
    cache.close()


def test_paused_server_times_out_fast(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    """A hung Redis (SIGSTOP) costs at most the socket timeout, then the breaker opens."""
    server = redis_server_factory()
    cache = rcache.Cache(
        server.url,
        breaker=FAST_BREAKER,
        retry=rcache.RetryPolicy(attempts=1),
        redis_options={"socket_timeout": 0.2},
    )

    @cache.cached(ttl=60)
    def f() -> int:
        return 5

    assert f() == 5
    server.pause()
    try:
        for _ in range(10):
            assert f() == 5
        m = cache.metrics
        assert isinstance(m, rcache.InMemoryMetrics)
        name = f._spec.name  # type: ignore[attr-defined]
        assert m.count("cache_errors", name, "get", "TimeoutError") == 2
        assert m.count("cache_errors", name, "get", "CircuitOpen") == 8
    finally:
        server.resume()
    cache.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_paused_server_costs_one_socket_timeout_under_the_default_retries(
    redis_server_factory: Callable[[], RedisServer], mode: str
) -> None:
    """With the default RetryPolicy (attempts=2, max_time=0.5) a reply that did not come
    within a 0.6 s socket timeout is not retried: the retry's new connection would wait
    as long again in its handshake. Before, each call took 1.2 s (2.0 s with the 1 s
    default) until the breaker opened."""
    server = redis_server_factory()
    cache = rcache.Cache(
        server.url, breaker=FAST_BREAKER, redis_options={"socket_timeout": 0.6}
    )

    @cache.cached(ttl=60)
    def f() -> int:
        return 5

    @cache.cached(ttl=60)
    async def g() -> int:
        return 5

    async def call() -> float:
        start = time.monotonic()
        assert (f() if mode == "sync" else await g()) == 5
        return time.monotonic() - start

    assert await call() < 0.5  # warm: connections made, scripts loaded
    server.pause()
    try:
        stalls = [await call() for _ in range(3)]
    finally:
        server.resume()
    assert max(stalls[:2]) < 0.6 + 0.35, stalls  # one socket timeout, not two
    assert stalls[2] < 0.1, stalls  # the breaker is open: no network
    await cache.aclose()
    cache.close()
