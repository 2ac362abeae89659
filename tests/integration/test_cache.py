"""The cache decorator and explicit operations against a real redis-server, sync and async."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
import redis

import rcache
from rcache import ConfigurationError, SerializationError

# every test also on Redis Cluster (tests/conftest.py), but single_server ones
pytestmark = pytest.mark.topologies("single", "cluster")


def test_sync_miss_then_hit_then_invalidate(cache: rcache.Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def get_user(user_id: int) -> dict[str, Any]:
        calls.append(user_id)
        return {"id": user_id, "at": dt.date(2024, 1, 2)}

    assert get_user(1) == {"id": 1, "at": dt.date(2024, 1, 2)}
    assert get_user(1) == {"id": 1, "at": dt.date(2024, 1, 2)}
    assert calls == [1]
    assert get_user.invalidate(1) is True
    assert get_user.invalidate(1) is False
    get_user(1)
    assert calls == [1, 1]
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    name = get_user._spec.name  # type: ignore[attr-defined]
    assert m.count("cache_gets", name, "hit") == 1
    assert m.count("cache_gets", name, "miss") == 2


@pytest.mark.single_server
async def test_async_miss_then_hit_then_invalidate(cache: rcache.Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl="10m", key="user:{user_id}")
    async def load_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    assert await load_user(7) == {"id": 7}
    assert await load_user(user_id=7) == {"id": 7}
    assert calls == [7]
    assert load_user.key_for(7) == "test:k:user:7"
    assert await cache.aget("user:7") == {
        "id": 7
    }  # template keys share the explicit namespace
    assert await load_user.invalidate(7) is True
    assert await load_user(7) == {"id": 7}
    assert calls == [7, 7]


def test_ttl_is_set_in_redis(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    @cache.cached(ttl=30)
    def f(x: int) -> int:
        return x

    f(1)
    pttl = redis_client.pttl(f.key_for(1))
    assert 29_000 < pttl <= 30_000


async def test_refresh_recomputes(cache: rcache.Cache, mode: Any) -> None:
    n = {"v": 0}

    @mode.cached(cache, ttl=60)
    def f() -> int:
        n["v"] += 1
        return n["v"]

    assert await mode(f) == 1
    assert await mode(f) == 1
    assert await mode(f.refresh) == 2
    assert await mode(f) == 2


def test_none_is_cached_and_opt_outs(cache: rcache.Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    def a(x: int) -> None:
        calls.append(("a", x))

    @cache.cached(ttl=60, cache_none=False)
    def b(x: int) -> None:
        calls.append(("b", x))

    @cache.cached(ttl=60, unless=lambda r: r < 0)
    def c(x: int) -> int:
        calls.append(("c", x))
        return x

    a(1), a(1), b(1), b(1), c(-1), c(-1), c(1), c(1)
    assert calls == [("a", 1), ("b", 1), ("b", 1), ("c", -1), ("c", -1), ("c", 1)]


def test_keys_distinguish_types_and_bind_defaults(cache: rcache.Cache) -> None:
    calls: list[Any] = []

    @cache.cached(ttl=60)
    def f(a: Any, b: int = 2) -> str:
        calls.append((a, b))
        return repr(a)

    assert f(1) == "1"
    assert f("1") == "'1'"
    assert f(1, b=2) == "1" and f(1, 2) == "1" and f(a=1) == "1"
    assert calls == [(1, 2), ("1", 2)]


def test_methods_bind_and_ignore_self(cache: rcache.Cache) -> None:
    class Repo:
        def __init__(self) -> None:
            self.calls = 0

        @cache.cached(ttl=60, ignore=("self",))
        def get(self, x: int) -> int:
            self.calls += 1
            return x * 2

    r1, r2 = Repo(), Repo()
    assert r1.get(2) == 4
    assert r2.get(2) == 4  # self ignored: shared entry
    assert r1.calls == 1 and r2.calls == 0
    assert r1.get.key_for(2) == r2.get.key_for(2)
    assert r1.get.invalidate(2) is True


def test_unserializable_result(cache: rcache.Cache) -> None:
    class Thing:
        pass

    @cache.cached(ttl=60)
    def bad() -> object:
        return Thing()

    with pytest.raises(SerializationError, match=r"bad.*Thing"):
        bad()

    calls = []

    @cache.cached(ttl=60, on_unserializable="skip")
    def skipped() -> object:
        calls.append(1)
        return Thing()

    assert isinstance(skipped(), Thing)
    assert isinstance(skipped(), Thing)
    assert len(calls) == 2


def test_undecodable_entry_is_a_counted_miss(
    cache: rcache.Cache, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x + 1

    redis_client.set(f.key_for(1), b"not an envelope")
    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        assert f(1) == 2
    assert f(1) == 2  # rewritten, now a hit
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    name = f._spec.name  # type: ignore[attr-defined]
    assert m.count("cache_errors", name, "decode", "UndecodableError") == 1
    assert m.count("cache_gets", name, "hit") == 1
    assert "could not be decoded" in caplog.text
    assert "not an envelope" not in caplog.text  # values are never logged


@pytest.mark.single_server
def test_explicit_get_set_delete(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    assert cache.get("missing") is None
    assert cache.get("missing", default="d") == "d"
    assert cache.set("k", {"v": (1, 2)}, ttl=10) is True
    assert cache.get("k") == {"v": (1, 2)}
    assert 9_000 < redis_client.pttl("test:k:k") <= 10_000
    assert cache.set("none", None, ttl=10)
    assert cache.get("none", default="d") is None
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.get("k") is None


async def test_explicit_async_twins(cache: rcache.Cache) -> None:
    assert await cache.aget("k") is None
    assert await cache.aset("k", [1, "x"], ttl="1m")
    assert await cache.aget("k") == [1, "x"]
    assert cache.get("k") == [1, "x"]  # sync and async share the data
    assert await cache.adelete("k") is True
    assert await cache.aping() is True


def test_default_ttl_and_missing_ttl(redis_url: str) -> None:
    c = rcache.Cache(redis_url, ttl=5)

    @c.cached
    def f() -> int:
        return 1

    assert f() == 1
    c2 = rcache.Cache(redis_url)
    with pytest.raises(ConfigurationError, match="ttl=60"):
        c2.cached(lambda: 1)
    with pytest.raises(ConfigurationError, match="ttl"):
        c2.set("k", 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl": -1}, "positive"),
        ({"ttl": 0}, "positive"),
        ({"ttl": "soon"}, "cannot parse"),
        ({"ttl": 5, "key": "user:{uid}"}, "does not take"),
        ({"ttl": 5, "ignore": ("nope",)}, "does not take"),
        ({"ttl": 5, "on_backend_error": "ignore"}, "bypass"),
        ({"ttl": 5, "on_unserializable": "drop"}, "skip"),
    ],
)
def test_bad_decoration_fails_early(
    cache: rcache.Cache, kwargs: Any, match: str
) -> None:
    def user(user_id: int) -> int:
        return user_id

    with pytest.raises(ConfigurationError, match=match):
        cache.cached(**kwargs)(user)


def test_decorating_a_non_callable(cache: rcache.Cache) -> None:
    with pytest.raises(ConfigurationError, match=r"cache.cached\(ttl=60\)"):
        cache.cached(60)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="decorates functions"):
        cache.cached(ttl=5)(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="below @classmethod"):
        cache.cached(ttl=5)(classmethod(lambda cls: 1))  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "url", ["http://localhost", "rediss+sentinel://x", "mysql://db", "localhost:6379"]
)
def test_unknown_url_scheme(url: str) -> None:
    with pytest.raises(ConfigurationError, match="redis://"):
        rcache.Cache(url)


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.delenv("RCACHE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    c = rcache.Cache()
    assert c.ping()
    monkeypatch.setenv("RCACHE_URL", "memory://")
    assert rcache.Cache().is_memory


@pytest.mark.single_server
def test_user_client_with_decode_responses(redis_server: Any, redis_url: str) -> None:
    client = redis_server.client(decode_responses=True)
    c = rcache.Cache(client=client, prefix="dr")
    assert c.set("k", {"b": b"\xff"}, ttl=5)
    assert c.get("k") == {"b": b"\xff"}
    client.close()


async def test_async_clients_are_per_event_loop(redis_url: str) -> None:
    c = rcache.Cache(redis_url)
    c.set("k", 1, ttl=5)
    assert await c.aget("k") == 1
    # a second loop in a thread gets its own client (a redis.asyncio client is loop-bound)
    import asyncio
    import threading

    out: list[Any] = []

    async def in_other_loop() -> Any:
        try:
            return await c.aget("k")
        finally:
            await c.aclose()

    t = threading.Thread(target=lambda: out.append(asyncio.run(in_other_loop())))
    t.start()
    t.join(10)
    assert out == [1]
    await c.aclose()


def test_pickle_serializer_is_signed(redis_url: str, redis_client: redis.Redis) -> None:
    c = rcache.Cache(redis_url, serializer=rcache.PickleSerializer(secret="s" * 32))
    c.set("obj", {"when": dt.datetime(2024, 1, 1)}, ttl=5)
    assert c.get("obj") == {"when": dt.datetime(2024, 1, 1)}
    other = rcache.Cache(redis_url, serializer=rcache.PickleSerializer(secret="t" * 32))
    assert (
        other.get("obj", default="miss") == "miss"
    )  # wrong signature: refused, a miss
