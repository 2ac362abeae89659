"""Early refresh, stale-while-revalidate, stale-if-error, tags and batches on real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

import rcache
from rcache._freshness import EARLY, EXPIRED, FRESH, MISS, STALE, Freshness
from rcache._serializers import Envelope, decode_envelope
from rcache.testing import wait_until

# every test also on Redis Cluster (tests/conftest.py), but single_server ones
pytestmark = pytest.mark.topologies("single", "cluster")


def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in info.items()
        if not k.startswith(
            "cmdstat_config"
        )  # the CONFIG RESETSTAT that started the count
    }


# -- pure decisions ---------------------------------------------------------------------


def env(fresh_until: float, compute: float = 0.1) -> Envelope:
    return Envelope("v", 0.0, compute, fresh_until, b"")


def test_classify_windows() -> None:
    f = Freshness(ttl=10, stale=5)
    assert f.classify(None, 0) == MISS
    assert f.classify(env(100), 99) == FRESH
    assert f.classify(env(100), 100) == STALE
    assert f.classify(env(100), 104.9) == STALE
    assert f.classify(env(100), 105) == EXPIRED
    assert f.redis_ttl == 15


def test_xfetch_probability_rises_towards_expiry() -> None:
    f = Freshness(ttl=10, beta=1.0)
    e = env(100, compute=1.0)
    # gap = -delta * beta * ln(1 - r): r = 0.5 -> gap ~ 0.69 s
    assert f.classify(e, 99.0, rand=lambda: 0.5) == FRESH
    assert f.classify(e, 99.5, rand=lambda: 0.5) == EARLY
    # far from expiry only an extreme draw refreshes
    assert f.classify(e, 90.0, rand=lambda: 0.5) == FRESH
    assert f.classify(e, 90.0, rand=lambda: 0.99999) == EARLY
    assert Freshness(ttl=10).classify(e, 99.99, rand=lambda: 0.99999) == FRESH  # off


def test_stale_if_error_window() -> None:
    f = Freshness(ttl=10, stale_if_error=30)
    assert f.usable_on_error(env(100), 129)
    assert not f.usable_on_error(env(100), 131)
    assert not f.usable_on_error(None, 0)


# -- on Redis -------------------------------------------------------------------------


def wait_past_fresh(cache: rcache.Cache, key: str) -> None:
    """Poll (with a deadline) until the stored entry's logical expiry has passed."""
    raw = cache._sync.client.get(key)
    assert isinstance(raw, bytes), "no entry stored"
    fresh_until = decode_envelope(cache.serializer, raw).fresh_until
    wait_until(
        lambda: time.time() > fresh_until, timeout=10, message="entry to go stale"
    )


def test_stale_while_revalidate_sync(cache: rcache.Cache) -> None:
    version = {"v": 1}
    refreshed = threading.Event()

    @cache.cached(ttl=0.3, stale=30)
    def f() -> int:
        if version["v"] > 1:
            refreshed.set()
        return version["v"]

    assert f() == 1
    wait_past_fresh(cache, f.key_for())
    version["v"] = 2
    assert f() == 1  # stale: the old value at once, while one refresh runs
    assert refreshed.wait(10), "the background refresh did not run"
    wait_until(lambda: f() == 2, timeout=5, message="refreshed value")
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    assert m.count("cache_gets", f._spec.name, "stale") >= 1  # type: ignore[attr-defined]


async def test_stale_while_revalidate_async(cache: rcache.Cache) -> None:
    version = {"v": 1}

    @cache.cached(ttl=0.3, stale=30)
    async def f() -> int:
        return version["v"]

    assert await f() == 1
    wait_past_fresh(cache, f.key_for())
    version["v"] = 2
    assert await f() == 1  # stale, served at once; the refresh runs as a task
    deadline = time.monotonic() + 5
    while await f() != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)  # poll interval; yields to the refresh task


def test_refresh_runner_is_pluggable(cache: rcache.Cache) -> None:
    jobs: list[Any] = []

    @cache.cached(ttl=0.2, stale=30, refresh_runner=jobs.append)
    def f() -> float:
        return time.time()

    first = f()
    wait_past_fresh(cache, f.key_for())
    assert f() == first
    assert len(jobs) == 1
    jobs[0]()  # e.g. a Celery task would run this
    assert f() != first


async def test_stale_if_error(cache: rcache.Cache, mode: Any) -> None:
    fail = {"on": False}

    @mode.cached(cache, ttl=0.2, stale_if_error=30)
    def f() -> str:
        if fail["on"]:
            raise ConnectionError("database down")
        return "good"

    assert await mode(f) == "good"
    fail["on"] = True
    wait_past_fresh(cache, f.key_for())
    assert await mode(f) == "good"  # served from the last value, error swallowed

    @mode.cached(cache, ttl=0.2)
    def g() -> str:
        if fail["on"]:
            raise ConnectionError("database down")
        return "good"

    fail["on"] = False
    await mode(g)
    fail["on"] = True
    wait_until(lambda: cache._sync.client.get(g.key_for()) is None, timeout=10)
    with pytest.raises(ConnectionError):
        await mode(g)


def test_early_refresh_recomputes_before_expiry(cache: rcache.Cache) -> None:
    calls = []

    @cache.cached(ttl=2, early=1e6)  # huge beta: every hit is "close to expiry"
    def f() -> int:
        calls.append(1)
        time.sleep(0.01)
        return len(calls)

    assert f() == 1
    assert f() == 2  # refreshed early by this caller, value still fresh
    assert len(calls) == 2


@pytest.mark.single_server
def test_tags_invalidate_in_one_command(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["users", "user:{user_id}"])
    def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    for uid in range(50):
        get_user(uid)
    assert len(calls) == 50
    redis_client.config_resetstat()
    assert cache.invalidate_tags("user:7") == 1
    stats = commandstats(redis_client)
    assert stats == {"del": 1}  # one DEL: no KEYS, no SCAN, no tag sets
    get_user(7), get_user(8)
    assert calls[-1] == 7 and len(calls) == 51  # only user 7 recomputed
    cache.invalidate_tags("users")
    for uid in range(50):
        get_user(uid)
    assert len(calls) == 101


async def test_tags_async(cache: rcache.Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["user:{user_id}"])
    async def get_user(user_id: int) -> int:
        calls.append(user_id)
        return user_id

    await get_user(1), await get_user(1)
    assert await cache.ainvalidate_tags("user:1") == 1
    await get_user(1)
    assert calls == [1, 1]


@pytest.mark.single_server
def test_invalidate_all_is_o1(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        calls.append(x)
        return x

    for x in range(20):
        f(x)
    redis_client.config_resetstat()
    assert f.invalidate_all() is True
    assert commandstats(redis_client) == {"del": 1}
    for x in range(20):
        f(x)
    assert len(calls) == 40


@pytest.mark.single_server
def test_hit_is_one_round_trip_with_tags_and_protection(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    @cache.cached(ttl=60, tags=["a", "b:{x}"], early=True, stale=10)
    def f(x: int) -> int:
        return x

    f(1)
    redis_client.config_resetstat()
    for _ in range(10):
        f(1)
    assert commandstats(redis_client) == {"mget": 10}


def test_raced_write_is_rejected(cache: rcache.Cache) -> None:
    """An invalidation during the computation stops its (stale) result being stored."""
    started, proceed = threading.Event(), threading.Event()
    source = {"v": "old"}

    @cache.cached(ttl=60, tags=["doc:{doc_id}"])
    def load(doc_id: int) -> str:
        value = source["v"]  # read the source ...
        started.set()
        proceed.wait(10)  # ... while someone updates it and invalidates
        return value

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(load(1)))
    t.start()
    assert started.wait(10)
    source["v"] = "new"
    cache.invalidate_tags("doc:1")
    proceed.set()
    t.join(10)
    assert result == ["old"]  # the caller gets what it computed ...
    started.clear()
    proceed.set()
    assert load(1) == "new"  # ... but it was not stored: the next call recomputes
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    assert m.count("cache_errors", load._spec.name, "set", "InvalidatedDuringLoad") == 1  # type: ignore[attr-defined]


def test_in_process_threads_share_one_computation(cache: rcache.Cache) -> None:
    calls = []
    gate = threading.Event()

    @cache.cached(ttl=60)
    def f() -> int:
        calls.append(1)
        gate.wait(10)
        return 7

    out: list[int] = []
    threads = [threading.Thread(target=lambda: out.append(f())) for _ in range(20)]
    for t in threads:
        t.start()
    flights = f._spec.flights  # type: ignore[attr-defined]
    wait_until(
        lambda: sum(fl.followers for fl in list(flights.values())) == 19,
        timeout=10,
        message="the other 19 callers to join the computation",
    )
    gate.set()
    for t in threads:
        t.join(10)
    assert out == [7] * 20 and calls == [1]


async def test_in_process_tasks_share_one_computation(cache: rcache.Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    async def f() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)
        return 7

    assert await asyncio.gather(*(f() for _ in range(30))) == [7] * 30
    assert calls == [1]


def test_shared_computation_shares_the_error(cache: rcache.Cache) -> None:
    gate = threading.Event()

    calls: list[int] = []

    @cache.cached(ttl=60)
    def f() -> int:
        calls.append(1)
        gate.wait(10)
        raise KeyError("nope")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            f()
        except KeyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    flights = f._spec.flights  # type: ignore[attr-defined]
    wait_until(
        lambda: sum(fl.followers for fl in list(flights.values())) == 4,
        timeout=10,
        message="the other 4 callers to join the computation",
    )
    gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 5
    assert calls == [1]  # one computation, its error shared by all five callers


@pytest.mark.single_server
def test_batches_explicit(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    redis_client.config_resetstat()
    assert cache.set_many({"a": 1, "b": (2,), "c": None}, ttl=30)
    assert cache.get_many(["a", "b", "c", "zz"]) == {"a": 1, "b": (2,), "c": None}
    assert cache.delete_many(["a", "zz"]) == 1
    stats = commandstats(redis_client)
    assert stats["mget"] == 1 and stats["del"] == 1 and stats["set"] == 3


async def test_batches_explicit_async(cache: rcache.Cache) -> None:
    assert await cache.aset_many({"a": 1, "b": 2}, ttl=30)
    assert await cache.aget_many(["a", "b", "x"]) == {"a": 1, "b": 2}
    assert await cache.adelete_many(["a", "b"]) == 2


def test_batch_decorator(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    calls: list[list[int]] = []

    @cache.cached_batch(ttl=60)
    def users(ids: list[int], lang: str = "en") -> dict[int, str]:
        calls.append(list(ids))
        return {i: f"{lang}-{i}" for i in ids if i != 99}

    assert users([1, 2]) == {1: "en-1", 2: "en-2"}
    redis_client.config_resetstat()
    assert users([1, 2, 3, 99]) == {1: "en-1", 2: "en-2", 3: "en-3"}
    assert calls == [[1, 2], [3, 99]]
    stats = commandstats(redis_client)
    assert stats["mget"] == 1 and stats["evalsha"] == 1  # one read, one store
    assert users([3], lang="fr") == {3: "fr-3"}  # other arguments are part of the key
    assert users.invalidate([1]) == 1  # type: ignore[attr-defined]
    users([1, 2])
    assert calls[-1] == [1]
    users.invalidate_all()  # type: ignore[attr-defined]
    users([1, 2])
    assert calls[-1] == [1, 2]


async def test_batch_decorator_async(cache: rcache.Cache) -> None:
    calls: list[list[int]] = []

    @cache.cached_batch(ttl=60)
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i * 10 for i in ids}

    assert await users([1, 2]) == {1: 10, 2: 20}
    assert await users([2, 3]) == {2: 20, 3: 30}
    assert calls == [[1, 2], [3]]


def test_bad_freshness_options(cache: rcache.Cache) -> None:
    def f(x: int) -> int:
        return x

    for kwargs in (
        {"early": -1},
        {"stale": 0},
        {"stale_if_error": "x"},
        {"tags": "users"},
        {"tags": ["user:{uid}"]},
        {"lease_ttl": 0},
        {"on_wait_timeout": "wait"},
    ):
        with pytest.raises(rcache.ConfigurationError):
            cache.cached(ttl=5, **kwargs)(f)


async def test_cancelled_leader_does_not_cancel_its_followers(
    cache: rcache.Cache,
) -> None:
    started = asyncio.Event()
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def f() -> int:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            await asyncio.sleep(30)  # the leader: cancelled while computing
        return 7

    leader = asyncio.ensure_future(f())
    await asyncio.wait_for(started.wait(), 10)
    follower = asyncio.ensure_future(f())
    await asyncio.sleep(0)  # one tick: the follower reaches its wait on the leader
    flights = f._spec.aflights[asyncio.get_running_loop()]  # type: ignore[attr-defined]
    assert len(flights) == 1  # one computation in flight, the follower waiting on it
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.wait_for(follower, 10) == 7  # fetched for itself
    assert len(calls) == 2


def test_many_stale_keys_refresh_on_a_bounded_number_of_threads(
    cache: rcache.Cache,
) -> None:
    """50 keys going stale together start at most REFRESH_WORKERS refresh threads
    (before: one thread per stale key), and every key is still refreshed."""
    from rcache._decorated import REFRESH_WORKERS

    version = {"v": 1}
    gate = threading.Event()

    @cache.cached(ttl=0.3, stale=30)
    def f(x: int) -> int:
        if version["v"] > 1:
            gate.wait(10)  # hold the refreshes so that they pile up
        return version["v"] * 1000 + x

    for x in range(50):
        assert f(x) == 1000 + x
    wait_past_fresh(cache, f.key_for(49))
    version["v"] = 2
    before = {t for t in threading.enumerate() if t.name == "rcache-refresh"}
    for x in range(50):
        assert f(x) == 1000 + x  # stale: served at once, one refresh queued per key
    started = [
        t
        for t in threading.enumerate()
        if t.name == "rcache-refresh" and t not in before
    ]
    assert 1 <= len(started) <= REFRESH_WORKERS
    gate.set()
    wait_until(
        lambda: all(f(x) == 2000 + x for x in range(50)),
        timeout=15,
        message="every stale key refreshed",
    )
