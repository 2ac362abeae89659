"""``rcache.spi``: what integrations run on a Cache, against a real redis-server."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import redis

import rcache
from rcache import spi


def test_importing_the_spi_starts_and_connects_nothing() -> None:
    code = (
        "import sys, threading\n"
        "before = threading.active_count()\n"
        "import rcache.spi\n"
        "assert threading.active_count() == before\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "assert 'celery' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_and_run_script_use_the_cache_client(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="spi")
    key = cache.keyspace.explicit("n")
    assert spi.run(cache, lambda c: c.set(key, b"1", nx=True)) is True
    script = spi.LuaScript(
        "incr_by", source="return redis.call('INCRBY', KEYS[1], ARGV[1])"
    )
    redis_client.script_flush()  # NOSCRIPT: loaded and run again
    assert spi.run_script(cache, script, [key], [41]) == 42
    assert spi.run_script(cache, script, [key], [1], retry=False) == 43
    assert redis_client.get(key) == b"43"
    cache.close()


async def test_async_twins(redis_url: str, redis_client: redis.Redis) -> None:
    cache = rcache.Cache(redis_url, prefix="spi")
    key = cache.keyspace.explicit("a")
    assert await spi.arun(cache, lambda c: c.set(key, b"1")) is True
    script = spi.LuaScript("get", source="return redis.call('GET', KEYS[1])")
    redis_client.script_flush()
    assert await spi.arun_script(cache, script, [key], []) == b"1"
    found = await spi.ascan(cache, cache.keyspace.pattern("k:"), count=1)
    assert found == [key.encode()]
    await cache.aclose()


def test_errors_are_mapped_and_fail_closed() -> None:
    # nothing listens there: BackendUnavailableError, even though the breaker would
    # let a cache read bypass Redis
    cache = rcache.Cache("redis://127.0.0.1:1/0", retry=rcache.RetryPolicy(attempts=1))
    with pytest.raises(rcache.BackendUnavailableError):
        spi.run(cache, lambda c: c.ping())
    lua = spi.LuaScript("bad", source="return redis.call('NOPE')")
    with pytest.raises(rcache.BackendUnavailableError):
        spi.run_script(cache, lua, [], [])
    cache.close()


def test_lua_errors_raise_backend_error(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="spi")
    lua = spi.LuaScript("bad", source="return redis.call('NOPE')")
    with pytest.raises(rcache.BackendError):
        spi.run_script(cache, lua, [], [])
    cache.close()


def test_scan_lists_only_the_pattern(redis_url: str, redis_client: redis.Redis) -> None:
    cache = rcache.Cache(redis_url, prefix="a*b")
    for i in range(7):
        redis_client.set(f"a*b:k:{i}", 1)
        redis_client.set(f"axb:k:{i}", 1)  # a glob would match it; the pattern doesn't
    found = spi.scan(cache, cache.keyspace.pattern("k:"), count=2)
    assert sorted(found) == sorted(f"a*b:k:{i}".encode() for i in range(7))
    cache.close()


def test_packaged_script_is_read_once_and_runs(redis_url: str) -> None:
    script = spi.packaged_script("rcache_celery", "_scripts/release.lua")
    assert script is spi.packaged_script("rcache_celery", "_scripts/release.lua")
    assert script.name == "release" and "@include" not in script.source
    cache = rcache.Cache(redis_url, prefix="spi")
    assert spi.run_script(cache, script, [cache.keyspace.lock_guard("x")], ["t"]) == 0
    cache.close()


def test_cached_info_describes_cached_functions_only() -> None:
    cache = rcache.Cache("memory://", prefix="spi")

    @cache.cached(ttl="2m")
    def f(x: int) -> int:
        return x

    @cache.cached(ttl=5, name="custom")
    async def g(x: int) -> int:
        return x

    @cache.cached_batch(ttl=5, ids="ids")
    def h(ids: list[int]) -> dict[int, int]:
        return {}

    class Service:
        @cache.cached(ttl=7)
        def m(self, x: int) -> int:
            return x

    info = spi.cached_info(f)
    assert info is not None
    assert (info.name, info.ttl, info.is_async, info.cache) == (
        spi.qualified_name(f.__wrapped__),
        120.0,
        False,
        cache,
    )
    assert info.function is f.__wrapped__
    ginfo = spi.cached_info(g)
    assert ginfo is not None and (ginfo.name, ginfo.is_async) == ("custom", True)
    minfo = spi.cached_info(Service().m)
    assert minfo is not None and minfo.ttl == 7.0
    not_cached: list[Any] = [h, len, lambda: 1, None]
    assert [spi.cached_info(x) for x in not_cached] == [None] * 4


def test_key_builder_binds_and_encodes_like_rcache_keys() -> None:
    def task(user_id: int, page: int = 1, *, debug: bool = False) -> None: ...

    keys = spi.KeyBuilder(task, prefix="app", ignore=("debug",), name="t")
    bound = keys.bind((42,), {"debug": True})
    assert bound == {"user_id": 42, "page": 1, "debug": True}
    assert keys.encode_args(bound) == "[42,1]"
    assert keys.value_key(bound) == spi.KeySpace("app").values("t") + "[42,1]"
    assert keys.build((42,), {}) == "app:c:t:[42,1]"
    with pytest.raises(rcache.ConfigurationError, match="did you mean"):
        keys.check_template("u:{user}")
