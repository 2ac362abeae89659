"""cache.script(): EVALSHA with transparent NOSCRIPT reload, sync and async."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

import rcache
from rcache._transaction import Script
from rcache.testing import RedisServer

INCR_CAPPED = """
-- KEYS[1] counter; ARGV[1] cap. Returns the new value, or -1 if the cap is reached.
local v = redis.call('INCR', KEYS[1])
if v > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return -1
end
return v
"""


def _scripts_loaded(client: redis.Redis, script: Script) -> bool:
    return bool(client.script_exists(script.sha)[0])


def test_script_runs_with_keys_and_args(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    capped = cache.script(INCR_CAPPED)
    assert not _scripts_loaded(redis_client, capped)  # nothing sent at registration
    assert [capped.run(keys=["quota:7"], args=[2]) for _ in range(3)] == [1, 2, -1]
    assert _scripts_loaded(redis_client, capped)
    assert redis_client.get("quota:7") == b"2"  # the caller's own key, no prefix
    assert capped.sha == redis_client.script_load(INCR_CAPPED)


def test_script_reloads_after_script_flush(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    capped = cache.script(INCR_CAPPED)
    assert capped.run(keys=["q"], args=[10]) == 1
    redis_client.script_flush()
    assert capped.run(keys=["q"], args=[10]) == 2


def test_script_survives_a_redis_restart(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test")
    capped = cache.script(INCR_CAPPED, load=True)
    assert capped.run(keys=["q"], args=[10]) == 1
    server.restart()  # same port, empty dataset, no scripts, pooled connection dead
    assert capped.run(keys=["q"], args=[10]) == 1
    assert capped.run(keys=["q"], args=[10]) == 2
    cache.close()


def _maint_off() -> dict[str, Any]:
    from redis.maint_notifications import MaintNotificationsConfig

    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            None,
            id="default-options",
        ),
        pytest.param(_maint_off(), id="maint-notifications-off"),
    ],
)
async def test_async_script_survives_a_redis_restart(
    redis_server_factory: Callable[[], RedisServer], options: dict[str, Any] | None
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test", redis_options=options)
    capped = await cache.ascript(INCR_CAPPED, load=True)
    admin = server.client()
    assert _scripts_loaded(admin, capped)
    assert await capped.arun(keys=["q"], args=[10]) == 1
    admin.close()
    try:
        # In a thread, as in an application whose event loop keeps running meanwhile.
        await asyncio.to_thread(server.restart)
        assert await capped.arun(keys=["q"], args=[10]) == 1
        assert await capped.arun(keys=["q"], args=[10]) == 2
        # The same Script object serves sync callers too.
        assert capped.run(keys=["q"], args=[10]) == 3
    finally:
        await cache.aclose()
        cache.close()


def test_script_errors_are_mapped(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    bad = cache.script("return redis.call('NOPE')")
    with pytest.raises(rcache.BackendError) as info:
        bad.run()
    assert not isinstance(info.value, rcache.BackendUnavailableError)
    assert isinstance(info.value.original, redis.ResponseError)
    with pytest.raises(rcache.ConfigurationError):
        cache.script("   ")


async def test_async_script_errors_are_mapped(cache: rcache.Cache) -> None:
    bad = await cache.ascript("return redis.call('NOPE')")
    with pytest.raises(rcache.BackendError):
        await bad.arun()
    await cache.aclose()


def test_script_on_unreachable_redis_raises_unavailable(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test")
    server.kill()
    with pytest.raises(rcache.BackendUnavailableError):
        cache.script(INCR_CAPPED, load=True)
    safe = cache.script("return 1", idempotent=True)
    assert safe.idempotent
    with pytest.raises(rcache.BackendUnavailableError):
        safe.run()
    cache.close()
