"""rcache through Redis Sentinel (rcache.testing.RedisSentinel: a primary, a replica and
three sentinels), by URL and by a user's ``Sentinel.master_for`` client, sync and async;
and the service back within 5 s after the primary is SIGKILLed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.sentinel

import rcache
from rcache.testing import RedisSentinel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinel]:
    """Shared by the tests that do not kill anything (~2 s to start)."""
    with RedisSentinel() as s:
        yield s


@pytest.fixture
def own_sentinels() -> Iterator[RedisSentinel]:
    """For a test that kills the primary."""
    with RedisSentinel() as s:
        yield s


def test_url_cached_function_and_lock_sync(sentinels: RedisSentinel) -> None:
    cache = rcache.Cache(sentinels.url, prefix="s", on_backend_error="raise")
    assert cache.is_cluster is False
    calls = 0

    @cache.cached(ttl=60, tags=["t"])
    def double(x: int) -> int:
        nonlocal calls
        calls += 1
        return 2 * x

    assert double(21) == 42
    assert double(21) == 42
    assert calls == 1  # the second call was a hit, served by the primary
    primary = sentinels.primary().client()
    assert primary.exists(double.key_for(21)) == 1
    primary.close()
    cache.invalidate_tags("t")
    assert double(21) == 42
    assert calls == 2

    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(5):
            with cache.lock("job", ttl=10, timeout=20):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most == 1
    cache.close()


async def test_url_cached_function_and_lock_async(sentinels: RedisSentinel) -> None:
    cache = rcache.Cache(sentinels.url, prefix="s", on_backend_error="raise")
    calls = 0

    @cache.cached(ttl=60)
    async def triple(x: int) -> int:
        nonlocal calls
        calls += 1
        return 3 * x

    assert await triple(5) == 15
    assert await triple(5) == 15
    assert calls == 1
    order: list[int] = []

    async def holder(i: int) -> None:
        async with cache.lock("ajob", ttl=10, timeout=20):
            order.append(i)
            await asyncio.sleep(0.01)
            order.append(i)

    await asyncio.gather(*(holder(i) for i in range(3)))
    assert all(order[j] == order[j + 1] for j in range(0, len(order), 2))
    await cache.aclose()


@pytest.mark.parametrize("decode", [False, True])
async def test_master_for_client_serves_sync_and_async(
    sentinels: RedisSentinel, decode: bool
) -> None:
    """Before: the first async call raised AttributeError ('SentinelConnectionPoolProxy'
    has no attribute 'connection_kwargs'), which escaped the bypass policy."""
    manager = redis.sentinel.Sentinel(sentinels.sentinel_addresses, socket_timeout=2)
    client = manager.master_for(sentinels.service, decode_responses=decode)
    cache = rcache.Cache(client=client, prefix="m", ttl=60, on_backend_error="raise")
    assert cache.set("k", {"v": 1})
    assert await cache.aget("k") == {"v": 1}
    assert await cache.aset("k2", [1])
    assert cache.get("k2") == [1]
    await cache.aclose()
    client.close()


def test_bad_sentinel_urls_are_configuration_errors() -> None:
    with pytest.raises(rcache.ConfigurationError, match="names no service"):
        rcache.Cache("redis+sentinel://127.0.0.1:26379")
    with pytest.raises(rcache.ConfigurationError, match="host:port"):
        rcache.Cache("redis+sentinel://127.0.0.1:port/mymaster")


def _back_after_kill(s: RedisSentinel, op: Any, timeout: float) -> float:
    """SIGKILL the primary, then call ``op()`` until it succeeds; the seconds it took."""
    old = s.kill_primary()
    killed = time.monotonic()
    deadline = killed + timeout
    while True:
        try:
            if op():
                return time.monotonic() - killed
        except rcache.BackendError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not served again within {timeout}s of SIGKILL (old primary {old.port})"
            )
        time.sleep(0.05)


def test_primary_sigkill_service_back_within_5s(own_sentinels: RedisSentinel) -> None:
    # default policy (bypass, breaker): the application keeps running meanwhile
    cache = rcache.Cache(own_sentinels.url, prefix="s", ttl=60)
    calls = 0

    @cache.cached
    def load(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    assert load(1) == 1
    old_port = own_sentinels.primary_port()

    def served() -> bool:
        assert load(1) == 1  # never raises: bypassed while there is no primary
        return bool(cache.set("probe", 1)) and cache.get("probe") == 1

    took = _back_after_kill(own_sentinels, served, timeout=5.0)
    print(f"sync: served again {took:.2f}s after SIGKILL")
    assert own_sentinels.primary_port() != old_port
    cache.close()


async def test_primary_sigkill_service_back_within_5s_async(
    own_sentinels: RedisSentinel,
) -> None:
    cache = rcache.Cache(own_sentinels.url, prefix="s", ttl=60)
    assert await cache.aset("before", 1)
    old = own_sentinels.kill_primary()
    killed = time.monotonic()
    while not (await cache.aset("probe", 1) and await cache.aget("probe") == 1):
        assert time.monotonic() - killed < 5.0, "not served again within 5 s"
        await asyncio.sleep(0.05)
    print(f"async: served again {time.monotonic() - killed:.2f}s after SIGKILL")
    assert own_sentinels.primary_port() != old.port
    await cache.aclose()


async def test_check_passes_through_sentinel(sentinels: RedisSentinel) -> None:
    cache = rcache.Cache(sentinels.url, prefix="s")
    assert "db 0" in cache.check()
    assert "db 0" in await cache.acheck()
    await cache.aclose()
    cache.close()
