"""rcache on a real local Redis Cluster (rcache.testing.RedisCluster): explicit
operations, every lock kind, one-slot transactions, errors mapped, admin scans; the cache's
own features there (slot groups, issue 15) are in test_cluster_cache.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import rcache
from rcache._transaction import hash_slot
from rcache.testing import RedisCluster, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(cluster_url: str) -> Iterator[rcache.Cache]:
    c = rcache.Cache(cluster_url, prefix="t", ttl=60, on_backend_error="raise")
    yield c
    c.close()


def _spread(keys: list[str]) -> int:
    return len({hash_slot(k) for k in keys})


# -- the fixture ----------------------------------------------------------------------


def test_fixture_serves_every_slot_range_from_three_primaries(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    assert len(redis_cluster.primaries()) == 3
    assert len(redis_cluster.replicas()) == 3
    client = redis_cluster.client()
    try:
        for i in range(60):
            client.set(f"k{i}", i)
        sizes = []
        for node in redis_cluster.primaries():
            c = node.client()
            sizes.append(c.dbsize())
            c.close()
        assert sum(sizes) == 60
        assert all(n > 0 for n in sizes)  # the keys really landed on three nodes
    finally:
        client.close()


def test_flush_between_tests_empties_every_primary(redis_cluster: RedisCluster) -> None:
    client = redis_cluster.client()
    try:
        for i in range(30):
            client.set(f"f{i}", i)
        redis_cluster.flush()
        assert all(client.get(f"f{i}") is None for i in range(30))
    finally:
        client.close()


def test_sigkill_of_a_primary_promotes_its_replica_and_rcache_serves_again() -> None:
    with RedisCluster() as cluster:
        cache = rcache.Cache(cluster.url, prefix="t", ttl=60, on_backend_error="raise")
        assert cache.set("before", "kept")
        victim = cluster.node_for("t:k:before")
        admin = victim.client()
        admin.wait(1, 2000)  # replicated before the kill, so it must survive
        admin.close()
        replica_ports = {n.port for n in cluster.replicas()}
        killed = time.monotonic()
        cluster.kill_primary(victim)
        promoted = cluster.wait_promoted(victim, timeout=15)
        assert promoted.port in replica_ports  # a former replica serves the slots now

        def served() -> bool:
            try:
                return bool(cache.get("before") == "kept")
            except rcache.BackendUnavailableError:
                return False

        wait_until(served, timeout=10, interval=0.05, message="rcache served again")
        print(f"served again {time.monotonic() - killed:.2f}s after SIGKILL")
        assert cache.set("after", 1)
        assert cache.get("after") == 1
        # a graceful CLUSTER FAILOVER of another shard: roles swap, no data lost
        replica = cluster.replicas()[0]
        cluster.failover(replica)
        assert replica in cluster.primaries()
        wait_until(served, timeout=10, interval=0.05, message="served after FAILOVER")
        assert cache.get("after") == 1
        cache.close()


# -- what works on a cluster ----------------------------------------------------------


def test_explicit_operations_across_slots_sync(cache: rcache.Cache) -> None:
    assert cache.is_cluster
    keys = [f"user:{i}" for i in range(12)]
    assert _spread([cache._key(k) for k in keys]) > 1
    assert cache.set("user:1", {"name": "ada"})
    assert cache.get("user:1") == {"name": "ada"}
    assert cache.set_many({k: i for i, k in enumerate(keys)})
    assert cache.get_many(keys) == {k: i for i, k in enumerate(keys)}
    assert cache.delete("user:0")
    assert cache.delete_many(keys) == len(keys) - 1
    assert cache.get_many(keys) == {}
    assert cache.ping()


async def test_explicit_operations_across_slots_async(cache: rcache.Cache) -> None:
    keys = [f"item:{i}" for i in range(12)]
    assert await cache.aset("item:1", [1, 2])
    assert await cache.aget("item:1") == [1, 2]
    assert await cache.aset_many({k: i for i, k in enumerate(keys)})
    assert await cache.aget_many(keys) == {k: i for i, k in enumerate(keys)}
    assert await cache.adelete_many(keys) == len(keys)
    assert await cache.aping()
    await cache.aclose()


def test_a_user_redis_cluster_client_serves_sync_and_async(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    client = redis_cluster.client()
    cache = rcache.Cache(client=client, prefix="t", ttl=60, on_backend_error="raise")
    assert cache.is_cluster
    assert cache.set("a", 1)

    async def main() -> Any:
        try:
            return await cache.aget("a")
        finally:
            await cache.aclose()

    assert asyncio.run(main()) == 1
    client.close()


def _contend(make_lock: Any, holders: int = 4, rounds: int = 5) -> int:
    """Threads take ``make_lock()`` in turn; returns the most holders seen at once."""
    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(rounds):
            with make_lock():
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(holders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return most


@pytest.mark.parametrize("fair", [False, True])
def test_lock_and_fair_lock_exclude_and_hand_off(
    cache: rcache.Cache, fair: bool
) -> None:
    # names with braces: the lock's keys keep one slot whatever the name holds
    name = "job:{odd}" if fair else "a}b"
    assert _contend(lambda: cache.lock(name, ttl=10, timeout=20, fair=fair)) == 1


def test_semaphore_caps_holders(cache: rcache.Cache) -> None:
    assert _contend(lambda: cache.semaphore("quota", 2, ttl=10, timeout=20), 5) == 2


def test_rwlock_writer_excludes_and_readers_share(cache: rcache.Cache) -> None:
    rw = cache.rwlock("doc:1", ttl=10, timeout=5)
    writer = cache.rwlock("doc:1", ttl=10, timeout=0.2).write()
    with rw.read(), cache.rwlock("doc:1", ttl=10, timeout=5).read():
        assert not writer.acquire(timeout=0.2)  # two readers share; the writer waits
    assert _contend(lambda: cache.rwlock("doc:1", ttl=10, timeout=20).write()) == 1


def test_locked_decorator(cache: rcache.Cache) -> None:
    @cache.locked("invoice:{n}", ttl=10, timeout=5)
    def bill(n: int) -> int:
        return n * 2

    assert bill(21) == 42


async def test_async_lock_hand_off(cache: rcache.Cache) -> None:
    order: list[int] = []

    async def holder(i: int) -> None:
        async with cache.lock("async-job", ttl=10, timeout=20):
            order.append(i)
            await asyncio.sleep(0.01)
            order.append(i)

    await asyncio.gather(*(holder(i) for i in range(4)))
    # never interleaved: each holder's two marks are adjacent
    assert all(order[j] == order[j + 1] for j in range(0, len(order), 2))
    await cache.aclose()


def test_transaction_on_one_slot_under_contention(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    keys = ["{cart:7}:qty", "{cart:7}:total"]
    assert _spread(keys) == 1

    def add(pipe: Any) -> None:
        qty = int(pipe.get(keys[0]) or 0)
        pipe.multi()
        pipe.set(keys[0], qty + 1)
        pipe.incrby(keys[1], 5)

    assert cache.transaction(add, watch=keys)[1] == 5

    def worker() -> None:
        for _ in range(10):
            cache.transaction(add, watch=keys, retries=200, max_time=30)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    client = redis_cluster.client()
    try:
        # WATCH held on the cluster: no lost update among 4 racing threads
        assert client.get(keys[0]) == b"41"
        assert client.get(keys[1]) == b"205"
    finally:
        client.close()
    assert cache.update("{cart:7}", lambda v: (v or 0) + 1) == 1
    assert cache.get("{cart:7}") == 1


def test_transaction_across_slots_is_refused_before_anything_is_sent(
    cache: rcache.Cache,
) -> None:
    ran = []
    with pytest.raises(rcache.ConfigurationError, match="hash tag"):
        cache.transaction(lambda pipe: ran.append(1), watch=["a", "b"])
    assert ran == []


async def test_async_transaction_on_one_slot(cache: rcache.Cache) -> None:
    keys = ["{order:9}:n"]

    async def bump(pipe: Any) -> None:
        n = int(await pipe.get(keys[0]) or 0)
        pipe.multi()
        pipe.incrby(keys[0], n + 1)

    assert await cache.atransaction(bump, watch=keys) == [1]
    assert await cache.atransaction(bump, watch=keys) == [3]
    assert await cache.aupdate("{order:9}", lambda v: (v or 0) + 1) == 1
    await cache.aclose()


def test_cross_slot_command_is_a_clear_backend_error_not_a_raw_exception(
    cache: rcache.Cache,
) -> None:
    # redis-py raises RedisClusterException (an Exception, not a RedisError) itself
    with pytest.raises(rcache.BackendError, match="hash tag") as info:
        cache._sync.run(lambda c: c.mget(["a", "b"]))
    assert not isinstance(info.value, rcache.BackendUnavailableError)
    assert isinstance(info.value.original, redis.exceptions.RedisClusterException)
    assert cache.breaker.allow()  # not counted as an outage


# -- every cached feature: slot groups (issue 15; test_cluster_cache.py has the rest) ----


def test_cached_features_that_spanned_slots_run(cache: rcache.Cache) -> None:
    # Before slot groups each of these raised ConfigurationError at decoration: an
    # entry's value, stamps, lease and wake-up list sat in different hash slots.
    def f(x: int) -> int:
        return x

    def ids(xs: list[int]) -> dict[int, int]:
        return {x: x for x in xs}

    for decorated in (
        cache.cached(f),
        cache.cached(ttl=10)(f),
        cache.cached(ttl=10, tags=["t"])(f),
        cache.cached(ttl=10, stampede=False)(f),
    ):
        assert decorated(7) == 7 and decorated(7) == 7
    assert cache.cached_batch(ttl=10)(ids)([1, 2, 3]) == {1: 1, 2: 2, 3: 3}


def test_url_errors_are_configuration_errors() -> None:
    with pytest.raises(rcache.ConfigurationError, match="only database 0"):
        rcache.Cache("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(rcache.ConfigurationError, match="host:port"):
        rcache.Cache("redis+cluster://127.0.0.1:x")


async def test_check_passes_on_a_cluster(cache: rcache.Cache) -> None:
    # Before: BLMOVE probe -> probe:to crossed slots, and the db lookup read a
    # connection_pool that cluster clients do not have (AttributeError).
    assert "work" in cache.check()
    assert "work" in await cache.acheck()
    await cache.aclose()


async def test_admin_stats_locks_and_clear_scan_every_primary(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    # Before: SCAN's cursor on a cluster client is per node (a dict): TypeError.
    keys = [f"k{i}" for i in range(20)]
    cache.set_many(dict.fromkeys(keys, 1))
    assert _spread([cache._key(k) for k in keys]) > 1
    with cache.lock("job", ttl=10):
        assert [info.name for info in cache.locks()] == ["job"]
        assert [info.name for info in await cache.alocks()] == ["job"]
        assert cache.stats().explicit_entries == 20
        assert (await cache.astats()).explicit_entries == 20
        assert cache.clear().deleted == 20  # the held lock is kept
    assert cache.get_many(keys) == {}
    cache.set_many(dict.fromkeys(keys, 1))
    assert (await cache.aclear()).deleted == 20
    await cache.aclose()
