"""The embedded memory:// backend (fakeredis): same semantics, Lua included."""

from __future__ import annotations

import rcache
from rcache._redis import LuaScript


def test_memory_cache_sync_and_async_share_data() -> None:
    cache = rcache.Cache("memory://", prefix="m")
    calls = []

    @cache.cached(ttl=60)
    def f(x: int) -> dict[str, int]:
        calls.append(x)
        return {"x": x}

    assert f(1) == {"x": 1} and f(1) == {"x": 1}
    assert calls == [1]
    assert cache.is_memory

    import asyncio

    async def main() -> object:
        await cache.aset("k", (1, 2), ttl=5)
        return await cache.aget("k")

    assert asyncio.run(main()) == (1, 2)
    assert cache.get("k") == (1, 2)


def test_memory_backend_runs_lua() -> None:
    cache = rcache.Cache("memory://")
    script = LuaScript("test", source="return redis.call('INCRBY', KEYS[1], ARGV[1])")
    client = cache._sync.client
    assert script(client, ["n"], [5]) == 5
    assert script(client, ["n"], [2]) == 7


def test_separate_memory_caches_are_isolated() -> None:
    a, b = rcache.Cache("memory://"), rcache.Cache("memory://")
    a.set("k", 1, ttl=5)
    assert b.get("k") is None
