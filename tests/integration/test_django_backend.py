"""rcache.django.RCacheBackend on a real redis-server: timeouts, raw ints, outage policy,
sharing, locks, clear, configuration errors. Django's own suite is in
test_django_suite.py; these cover what it does not."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import rcache
from rcache.testing import RedisServer

pytest.importorskip("django")  # the dev group installs it: never skipped in CI

from django.conf import settings
from django.test import override_settings

from rcache.django import RCacheBackend

if not settings.configured:
    settings.configure(SECRET_KEY="rcache-tests-" + "s" * 40, USE_TZ=True)

#: Every test runs on one server and on the session Redis Cluster (its keys then carry
#: slot groups: _k names them).
pytestmark = pytest.mark.topologies("single", "cluster")


def _k(backend: RCacheBackend, key: str, version: int = 1) -> str:
    """The Redis key of Django key ``key`` (either layout)."""
    return backend.rcache.keyspace.explicit(f":{version}:{key}")


FAST_BREAKER = {"failures": 2, "reset_after": 0.2, "max_reset_after": 0.4}


@pytest.fixture
def make(redis_url: str) -> Iterator[Callable[..., RCacheBackend]]:
    made: list[RCacheBackend] = []

    def make(location: str | None = None, **params: Any) -> RCacheBackend:
        params.setdefault("OPTIONS", {}).setdefault("prefix", "dj")
        backend = RCacheBackend(location or redis_url, params)
        made.append(backend)
        return backend

    yield make
    for b in made:
        b.rcache.close()


def test_timeouts_follow_django(
    make: Callable[..., RCacheBackend], redis_client: Any
) -> None:
    cache = make(TIMEOUT=120)
    cache.set("default", "v")
    assert 119_000 < redis_client.pttl(_k(cache, "default")) <= 120_000
    cache.set("forever", "v", None)
    assert redis_client.pttl(_k(cache, "forever")) == -1  # no expiry
    cache.set("float", "v", 1.5)
    assert 1000 < redis_client.pttl(_k(cache, "float")) <= 1500
    cache.set("gone", "v", 10)
    cache.set("gone", "v", 0)  # 0 = expire at once: the old value goes too
    assert redis_client.exists(_k(cache, "gone")) == 0
    assert cache.add("zero", "v", 0) is True and cache.get("zero") is None
    cache.set("neg", "v", -5)
    assert cache.get("neg", "miss") == "miss"
    assert make(TIMEOUT=None).get_backend_timeout() is None


def test_touch_none_on_a_key_without_expiry_is_true(
    make: Callable[..., RCacheBackend],
) -> None:
    # PERSIST alone answers 0 for a key that has no TTL; touch() must still say True
    cache = make()
    cache.set("k", 1, None)
    assert cache.touch("k", None) is True
    assert cache.touch("missing", None) is False


def test_ints_are_stored_raw_and_incr_keeps_the_ttl(
    make: Callable[..., RCacheBackend], redis_client: Any
) -> None:
    cache = make()
    cache.set("n", 41, 60)
    assert redis_client.get(_k(cache, "n")) == b"41"
    assert cache.incr("n") == 42 and cache.decr("n", 2) == 40
    assert redis_client.pttl(_k(cache, "n")) > 50_000
    cache.set("b", True)  # bool is not stored raw: it comes back as bool
    assert cache.get("b") is True
    cache.set("big", 2**70)  # beyond int64: an envelope, still an int on read
    assert cache.get("big") == 2**70
    with pytest.raises(TypeError):
        cache.incr("big")
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    assert redis_client.exists(_k(cache, "missing")) == 0  # INCRBY did not create it
    cache.set("s", "text")
    with pytest.raises(TypeError):
        cache.incr("s")


async def test_async_twins(make: Callable[..., RCacheBackend], redis_url: str) -> None:
    cache = make()
    await cache.aset("a", {"x": (1, 2)}, 30)
    assert await cache.aget("a") == {"x": (1, 2)}
    assert await cache.aadd("a", 1) is False
    assert await cache.aadd("b", 5) is True
    assert await cache.aincr("b", 3) == 8 and await cache.adecr("b") == 7
    with pytest.raises(ValueError):
        await cache.aincr("missing")
    assert await cache.aget_many(["a", "b", "c"]) == {"a": {"x": (1, 2)}, "b": 7}
    assert await cache.aset_many({"c": None, "d": b"\x00"}, None) == []
    assert await cache.ahas_key("c") is True and await cache.aget("c", "dflt") is None
    assert await cache.atouch("d", 5) is True and await cache.atouch("zz") is False
    assert await cache.aget_or_set("e", lambda: [1]) == [1]
    assert await cache.adelete("e") is True and await cache.adelete("e") is False
    await cache.adelete_many(["a", "b"])
    assert await cache.aget_many(["a", "b"]) == {}
    await cache.aclear()
    assert await cache.aget("d") is None
    await cache.aclose()
    await cache.rcache.aclose()


def test_values_are_shared_with_the_underlying_rcache_cache(
    make: Callable[..., RCacheBackend],
) -> None:
    cache = make(KEY_PREFIX="site")
    cache.set("greeting", "hello", 60)
    # Django's key "site:1:greeting" under rcache's explicit-key namespace
    assert cache.rcache.get("site:1:greeting") == "hello"
    cache.rcache.set("site:1:other", [1, 2], ttl=60)
    assert cache.get("other") == [1, 2]


def test_one_rcache_cache_per_configuration(
    make: Callable[..., RCacheBackend], redis_url: str
) -> None:
    a, b = make(), make(KEY_PREFIX="other")
    assert a.rcache is b.rcache  # KEY_PREFIX is Django's: same Redis, same Cache
    c = make(OPTIONS={"prefix": "dj", "on_backend_error": "raise"})
    assert c.rcache is not a.rcache

    # Django makes a backend per asyncio task (asgiref Local): they share one Cache,
    # hence one connection pool and one circuit breaker
    caches_setting = {
        "default": {
            "BACKEND": "rcache.django.RCacheBackend",
            "LOCATION": redis_url,
            "OPTIONS": {"prefix": "dj"},
        }
    }
    with override_settings(CACHES=caches_setting):
        from django.core.cache import caches

        async def one() -> tuple[int, rcache.Cache]:
            backend = caches["default"]
            return id(backend), backend.rcache

        async def main() -> list[tuple[int, rcache.Cache]]:
            return await asyncio.gather(*(one() for _ in range(4)))

        got = asyncio.run(main())
    assert len({i for i, _ in got}) > 1  # Django really made several backends
    assert {id(c) for _, c in got} == {id(a.rcache)}


def test_lock_is_reachable_from_caches(redis_url: str) -> None:
    caches_setting = {
        "default": {
            "BACKEND": "rcache.django.RCacheBackend",
            "LOCATION": redis_url,
            "OPTIONS": {"prefix": "djl"},
        }
    }
    with override_settings(CACHES=caches_setting):
        from django.core.cache import caches

        lock = caches["default"].lock("report", ttl=10, timeout=0)
        assert isinstance(lock, rcache.Lock)
        with lock:
            other = caches["default"].lock("report", ttl=10, timeout=0)
            assert other.acquire() is False  # held: one try, refused
            with pytest.raises(rcache.LockNotAcquiredError), other:
                pass
        assert other.acquire() is True
        other.release()

        async def main() -> None:
            async with caches["default"].lock("report", ttl=10, timeout=1):
                pass
            await caches["default"].rcache.aclose()

        asyncio.run(main())
        caches["default"].rcache.close()


def test_clear_removes_only_this_caches_values(
    make: Callable[..., RCacheBackend], redis_client: Any
) -> None:
    cache = make()
    cache.set_many({f"k{i}": i for i in range(2500)}, 60)  # more than one SCAN batch
    redis_client.set("unrelated", b"1")

    @cache.rcache.cached(ttl=60)
    def square(x: int) -> int:
        return x * x

    square(3)  # an rcache entry under the same prefix
    with cache.lock("held", ttl=10):
        cache.clear()
        assert redis_client.exists("unrelated") == 1
        assert {
            k for k in redis_client.keys("dj:*") if not k.startswith(b"dj:l:")
        } == set()
        assert any(k.startswith(b"dj:l:") for k in redis_client.keys("dj:*"))
    assert not any(b":k:" in k for k in redis_client.keys("dj:*"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_outage_bypass_reads_as_miss_and_opens_the_breaker(
    redis_server_factory: Callable[[], RedisServer],
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    server = redis_server_factory()
    cache = RCacheBackend(
        server.url, {"OPTIONS": {"prefix": "o", "breaker": FAST_BREAKER}}
    )
    cache.set("k", "v")
    server.kill()

    async def calls() -> list[Any]:
        return [
            await cache.aget("k", "dflt"),
            await cache.aset("k", "w"),
            await cache.aadd("new", 1),
            await cache.ahas_key("k"),
            await cache.aset_many({"a": 1, "b": 2}),
            await cache.atouch("k"),
            await cache.adelete("k"),
            await cache.aclear(),
        ]

    def sync_calls() -> list[Any]:
        return [
            cache.get("k", "dflt"),
            cache.set("k", "w"),
            cache.add("new", 1),
            cache.has_key("k"),
            cache.set_many({"a": 1, "b": 2}),
            cache.touch("k"),
            cache.delete("k"),
            cache.clear(),
        ]

    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        got = asyncio.run(calls()) if mode == "async" else sync_calls()
        with pytest.raises(ValueError):  # incr on "no value": Django's contract
            cache.incr("k")
    assert got == ["dflt", None, False, False, ["a", "b"], False, False, None]
    metrics = cache.rcache.metrics
    assert isinstance(metrics, rcache.InMemoryMetrics)
    assert metrics.count("cache_errors", "o", "get", "ConnectionError") == 1
    assert metrics.count("cache_errors", "o", "set", "ConnectionError") == 1
    # after two failures the breaker is open: later calls never touch the network
    assert metrics.count("cache_errors", "o", "set", "CircuitOpen") >= 3
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    cache.rcache.close()


def test_outage_raise_policy(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    cache = RCacheBackend(server.url, {"OPTIONS": {"on_backend_error": "raise"}})
    server.kill()
    with pytest.raises(rcache.BackendUnavailableError):
        cache.get("k")
    with pytest.raises(rcache.BackendUnavailableError):
        asyncio.run(cache.aset("k", 1))
    cache.rcache.close()


def test_signed_pickle_from_secret_key(
    make: Callable[..., RCacheBackend], redis_client: Any
) -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    with override_settings(SECRET_KEY="old-" + "a" * 40):
        old = make(OPTIONS={"prefix": "dp", "serializer": "pickle"})
        old.set("p", Point(3).__dict__)
        old.set("q", {"n": 1})
    # JSON refuses arbitrary objects, and says how to opt in
    with pytest.raises(rcache.SerializationError, match=r'\{"serializer": "pickle"\}'):
        make().set("obj", Point(1))
    # rotation: the new key signs, SECRET_KEY_FALLBACKS still verify
    with override_settings(
        SECRET_KEY="new-" + "b" * 40, SECRET_KEY_FALLBACKS=["old-" + "a" * 40]
    ):
        new = make(OPTIONS={"prefix": "dp", "serializer": "pickle"})
        assert new.rcache is not old.rcache
        assert new.get("p") == {"x": 3}
    with override_settings(SECRET_KEY="other-" + "c" * 40):
        stranger = make(OPTIONS={"prefix": "dp", "serializer": "pickle"})
        assert stranger.get("q", "refused") == "refused"  # signature mismatch: a miss
    # a tampered payload is refused, never unpickled
    raw = redis_client.get(_k(old, "q"))
    redis_client.set(_k(old, "q"), raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:])
    with override_settings(SECRET_KEY="old-" + "a" * 40):
        assert make(OPTIONS={"prefix": "dp", "serializer": "pickle"}).get("q") is None


@pytest.mark.parametrize(
    ("location", "options", "message"),
    [
        ("redis://a:6379/0,redis://b:6379/0", {}, "one Redis URL"),
        (["redis://a:6379/0", "redis://b:6379/0"], {}, "one Redis URL"),
        ("redis://a:6379/0", {"MAX_ENTRIES": 10}, "maxmemory-policy"),
        ("redis://a:6379/0", {"socket_timeout": 1}, "redis_options"),
        ("redis://a:6379/0", {"on_backend_error": "ignore"}, "'bypass' or 'raise'"),
        ("redis://a:6379/0", {"serializer": "yaml"}, "unknown serializer"),
        ("redis://a:6379/0", {"retry": {"tries": 3}}, "retry"),
        ("http://a/", {}, "redis://host:6379/0"),
    ],
)
def test_configuration_errors_say_what_to_write(
    location: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(rcache.ConfigurationError, match=message):
        RCacheBackend(location, {"OPTIONS": options})


def test_import_rcache_does_not_import_django() -> None:
    code = (
        "import sys, rcache; assert 'django' not in sys.modules, 'django imported'; "
        "import rcache.django; assert 'django' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_sink_and_name_from_options(make: Callable[..., RCacheBackend]) -> None:
    metrics = rcache.InMemoryMetrics()
    cache = make(OPTIONS={"prefix": "dm", "metrics": metrics, "name": "pages"})
    assert cache.rcache.metrics is metrics
    cache.get("k")
    cache.set("k", "v")
    cache.get("k")
    assert cache.get_many(["k", "absent"]) == {"k": "v"}
    assert metrics.count("cache_gets", "pages", "hit") == 2
    assert metrics.count("cache_gets", "pages", "miss") == 2
    assert metrics.count("cache_puts", "pages") == 1


def test_memory_location_is_one_store_for_every_thread() -> None:
    # Django makes a backend per thread; with memory:// a Cache per backend would have
    # been a private store per thread
    import threading

    opts = {"OPTIONS": {"prefix": "mem-threads"}}
    main = RCacheBackend("memory://", opts)
    main.set("n", 1)
    seen: list[int] = []
    t = threading.Thread(
        target=lambda: seen.append(RCacheBackend("memory://", opts).incr("n"))
    )
    t.start()
    t.join()
    assert seen == [2] and main.get("n") == 2


def test_set_with_zero_timeout_still_refuses_an_unserializable_value(
    make: Callable[..., RCacheBackend],
) -> None:
    with pytest.raises(rcache.SerializationError):
        make().set("k", object(), 0)


def test_unpicklable_value_raises_a_pickle_error_that_is_an_rcache_error(
    make: Callable[..., RCacheBackend],
) -> None:
    import pickle
    import threading

    from rcache.django import PicklingError

    cache = make(OPTIONS={"prefix": "dp2", "serializer": "pickle"})
    with pytest.raises(PicklingError) as info:
        cache.set("lock", threading.Lock())
    assert isinstance(info.value, pickle.PickleError)  # what Django's backends raise
    assert isinstance(info.value, rcache.SerializationError)
    assert cache.add("lock", threading.Lock) is True  # a class pickles by reference
