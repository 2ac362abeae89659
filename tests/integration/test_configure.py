"""Late configuration: ``Cache()`` at import time, the URL and prefix known only later."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import redis

import rcache
from rcache import ConfigurationError
from rcache.testing import RedisServer


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("RCACHE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    return monkeypatch


def test_url_from_env_set_after_construction(
    no_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(prefix="late")  # import time: no URL anywhere yet

    @cache.cached(ttl=60)
    def square(x: int) -> int:
        return x * x

    no_env.setenv("RCACHE_URL", redis_url)  # e.g. dotenv loaded by the app factory
    assert square(4) == 16
    assert redis_client.exists(square.key_for(4)) == 1
    cache.close()


async def test_url_from_env_set_after_construction_async(
    no_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(prefix="late")

    @cache.cached(ttl=60)
    async def square(x: int) -> int:
        return x * x

    no_env.setenv("REDIS_URL", redis_url)
    assert await square(5) == 25
    assert redis_client.exists(square.key_for(5)) == 1
    await cache.aclose()


def test_configure_moves_functions_decorated_before(
    no_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache()
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["user:{user_id}"])
    def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    assert get_user.key_for(1).startswith("rcache:c:")
    assert cache.configure(url=redis_url, prefix="shop") is cache
    assert get_user.key_for(1).startswith("shop:c:")
    assert get_user(1) == get_user(1) == {"id": 1}
    assert calls == [1]
    assert redis_client.exists(get_user.key_for(1)) == 1
    assert redis_client.exists("shop:s:t:user:1") == 1  # tag stamps follow the prefix
    assert cache.invalidate_tags("user:1") == 1
    get_user(1)
    assert calls == [1, 1]
    assert cache.set("k", 1, ttl=5)
    assert redis_client.exists("shop:k:k") == 1
    assert cache.name == "shop"
    cache.close()


async def test_configure_async_decorated_before(
    no_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(ttl=30)

    @cache.cached
    async def load(x: int) -> int:
        return x + 1

    cache.configure(url=redis_url, prefix="app", ttl=90)
    assert await load(1) == 2
    key = load.key_for(1)
    assert key.startswith("app:c:")
    assert 60 < redis_client.ttl(key) <= 90  # the new default ttl reached `load`
    await cache.aclose()


def test_configure_after_first_use_is_an_error_unless_forced(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="used")
    assert cache.set("a", 1, ttl=5)
    with pytest.raises(ConfigurationError, match=r"already in use.*force=True"):
        cache.configure(prefix="other")
    assert cache.prefix == "used"
    cache.configure(prefix="other", force=True)
    assert cache.get("a") is None  # another prefix: another namespace
    assert cache.set("a", 2, ttl=5)
    assert cache.get("a") == 2
    cache.close()


def test_invalid_configure_changes_nothing(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="keep")
    with pytest.raises(ConfigurationError, match="prefix"):
        cache.configure(prefix="has space")
    with pytest.raises(ConfigurationError, match="ttl"):
        cache.configure(ttl=-1)
    with pytest.raises(ConfigurationError, match="on_backend_error"):
        cache.configure(on_backend_error="ignore")  # type: ignore[arg-type]
    assert cache.prefix == "keep"
    assert cache.default_ttl is None
    assert cache.on_backend_error == "bypass"


def test_configure_client_replaces_url(
    no_env: pytest.MonkeyPatch, redis_url: str
) -> None:
    cache = rcache.Cache("redis://127.0.0.1:1/0")
    client = redis.Redis.from_url(redis_url)
    cache.configure(client=client)
    assert cache.set("c", 3, ttl=5)
    assert client.exists("rcache:k:c") == 1
    client.close()


def test_default_url_warns_once(
    no_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = rcache.Cache()
    caplog.set_level(logging.WARNING, logger="rcache.cache")
    # making the clients is the first use; no command is sent to 127.0.0.1:6379
    cache._sync.client  # noqa: B018
    cache._sync.blocking_client  # noqa: B018
    warnings = [r for r in caplog.records if "no Redis URL was configured" in r.message]
    assert len(warnings) == 1
    assert "redis://127.0.0.1:6379/0" in warnings[0].getMessage()
    assert "RCACHE_URL" in warnings[0].getMessage()
    cache.close()


def test_no_warning_when_a_url_is_known(
    no_env: pytest.MonkeyPatch, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rcache.cache")
    for cache in (rcache.Cache(redis_url), rcache.Cache().configure(url=redis_url)):
        cache._sync.client  # noqa: B018
        cache.close()
    no_env.setenv("REDIS_URL", redis_url)
    env_cache = rcache.Cache()
    env_cache._sync.client  # noqa: B018
    env_cache.close()
    assert not [r for r in caplog.records if "no Redis URL" in r.message]


def test_malformed_url_fails_at_configure() -> None:
    cache = rcache.Cache("memory://")
    with pytest.raises(ConfigurationError, match="redis://host"):
        cache.configure(url="http://example.com")
    assert cache.is_memory


def test_configure_moves_batch_functions_decorated_before(
    no_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache()

    @cache.cached_batch(ttl=60)
    def names(ids: list[int]) -> dict[int, str]:
        return {i: f"n{i}" for i in ids}

    cache.configure(url=redis_url, prefix="batch")
    assert names([1, 2]) == {1: "n1", 2: "n2"}
    keys = names.keys_for([1, 2])  # type: ignore[attr-defined]
    assert all(k.startswith("batch:c:") for k in keys)
    assert redis_client.exists(*keys) == 2
    cache.close()


def test_configure_lock_url_puts_locks_on_their_own_server(
    no_env: pytest.MonkeyPatch,
    redis_url: str,
    redis_client: redis.Redis,
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    locks = redis_server_factory()
    cache = rcache.Cache().configure(url=redis_url, prefix="cfl", lock_url=locks.url)
    lock_client = locks.client()
    with cache.lock("job", ttl=10):
        assert lock_client.exists("cfl:l:{job}") == 1
        assert redis_client.exists("cfl:l:{job}") == 0
    lock_client.close()
    cache.close()
