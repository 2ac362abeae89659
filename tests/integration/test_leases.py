"""The per-process lease renewer (rcache/_leases.py) against real redis-servers: which
client renews a lease, how many threads it takes, idle exit and fork."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio

import rcache
from rcache.testing import RedisServer


async def _apoll(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """wait_until for coroutines: poll without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return result


def _lease_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(match="*:lease"))


@pytest.mark.parametrize("sync_default", ["closed port", "other server"])
async def test_async_computation_lease_is_renewed_through_the_async_client(
    redis_server_factory: Callable[[], RedisServer],
    monkeypatch: pytest.MonkeyPatch,
    sync_default: str,
) -> None:
    # Cache(async_client=...) without a URL: a sync client would resolve $REDIS_URL,
    # which is not where the async traffic goes. The lease of an `async def` computation
    # lives on server A and must be renewed there, by the loop's client.
    a = redis_server_factory()
    if sync_default == "other server":
        b = redis_server_factory()
        monkeypatch.setenv("REDIS_URL", b.url)
    else:
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("RCACHE_URL", raising=False)
    cache = rcache.Cache(
        async_client=lambda: redis.asyncio.Redis(port=a.port), prefix="t"
    )
    release = asyncio.Event()

    @cache.cached(ttl=60, lease_ttl=0.3, name="slow")
    async def slow(x: int) -> int:
        await release.wait()
        return x

    client = a.client()
    try:
        task = asyncio.create_task(slow(1))
        (key,) = await _apoll(lambda: _lease_keys(client))
        token = client.get(key)
        assert token is not None
        # Held for more than four lease periods: renewed every lease_ttl / 3 on A.
        until = time.monotonic() + 1.3
        while time.monotonic() < until:
            assert client.get(key) == token, "the computation lease ran out on A"
            await asyncio.sleep(0.02)
        release.set()
        assert await task == 1
        assert _lease_keys(client) == []  # given up by the store
        if sync_default == "other server":
            other = b.client()
            assert other.dbsize() == 0  # nothing was ever sent to the sync default
            other.close()
    finally:
        release.set()
        client.close()
        await cache.aclose()
        cache.close()
