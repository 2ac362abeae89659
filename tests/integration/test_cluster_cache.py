"""Every cache feature on a real local Redis Cluster (slot groups, issue 15).

The session cluster (3 primaries, 3 replicas, flushed after each test) serves the
behaviour tests; the fault tests start a cluster of their own, because they kill,
migrate or unassign what they test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

import rcache
from rcache.testing import RedisCluster, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(cluster_url: str) -> Iterator[rcache.Cache]:
    c = rcache.Cache(cluster_url, prefix="t", ttl=60)
    yield c
    c.close()


NEVER_OPENS = rcache.BreakerPolicy(failures=1_000_000)


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


# -- the recorded slot groups --------------------------------------------------------------


def test_the_first_command_records_b(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    client = redis_cluster.client()
    try:
        assert client.get("t:cluster:groups") is None  # nothing connects at creation
        assert cache.set("a", 1)
        assert client.get("t:cluster:groups") == b"256"
        same = rcache.Cache(redis_cluster.url, prefix="t", slot_groups=256)
        assert same.get("a") == 1  # the same B: served
        same.close()
        # clear() keeps the record: it is a setting, not cached data
        assert cache.clear().deleted == 1
        assert client.get("t:cluster:groups") == b"256"
    finally:
        client.close()


@pytest.mark.parametrize("policy", ["bypass", "raise"])
async def test_another_b_is_refused_whatever_the_policy(
    cluster_url: str, policy: rcache.BackendErrorPolicy
) -> None:
    first = rcache.Cache(cluster_url, prefix="t", ttl=60, slot_groups=64)
    assert first.set("a", 1)
    other = rcache.Cache(
        cluster_url, prefix="t", ttl=60, slot_groups=256, on_backend_error=policy
    )
    with pytest.raises(rcache.ConfigurationError, match="slot_groups=64") as info:
        other.get("a")
    assert "Cache(..., slot_groups=64)" in str(info.value)
    with pytest.raises(rcache.ConfigurationError, match="slot_groups=64"):
        await other.aget("a")
    with pytest.raises(rcache.ConfigurationError, match="slot_groups=64"):
        other.check()
    # a setting to fix, not an outage: the breaker stays closed, nothing is bypassed
    assert other.breaker.allow()
    assert not [e for e in other.metrics.counts if e[0] == "cache_errors"]  # type: ignore[attr-defined]
    # another prefix has a record of its own
    third = rcache.Cache(cluster_url, prefix="u", ttl=60, slot_groups=256)
    assert third.set("a", 2) and third.get("a") == 2
    for c in (first, other, third):
        await c.aclose()
        c.close()


def test_keys_land_in_their_groups_and_explicit_ops_span_them(
    cache: rcache.Cache,
) -> None:
    keys = [f"user:{i}" for i in range(40)]
    full = [cache._key(k) for k in keys]
    assert all(cache.keyspace.group_of_key(k) is not None for k in full)
    assert len({_slot(k) for k in full}) > 10
    assert cache.set_many({k: i for i, k in enumerate(keys)})
    assert cache.get_many(keys) == {k: i for i, k in enumerate(keys)}
    assert cache.delete_many(keys[:20]) == 20
    assert cache.get_many(keys) == {k: i for i, k in enumerate(keys) if i >= 20}
    # explicit keys that share a hash tag share a slot: one-slot transactions work
    assert _slot(cache._key("{cart:7}:qty")) == _slot(cache._key("{cart:7}:total"))


# -- faults: each test owns its cluster ------------------------------------------------------


def test_tryagain_and_clusterdown_are_backend_unavailable() -> None:
    with RedisCluster(replicas=0) as cluster:
        cache = rcache.Cache(
            cluster.url,
            prefix="t",
            ttl=60,
            on_backend_error="raise",
            breaker=NEVER_OPENS,  # each step below meets Redis, not an open breaker
        )
        keys = ["{x}a", "{x}b"]
        full = [cache._key(k) for k in keys]
        slot = _slot(full[0])
        assert _slot(full[1]) == slot
        assert cache.set("{x}a", 1)
        source = cluster.node_for(full[0])
        target = next(n for n in cluster.primaries() if n.port != source.port)
        src, dst = source.client(), target.client()
        try:
            src_id = src.execute_command("CLUSTER MYID").decode()
            dst_id = dst.execute_command("CLUSTER MYID").decode()
            # the slot migrates: a multi-key read of it with a key missing gets TRYAGAIN
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            with pytest.raises(rcache.BackendUnavailableError, match="TTL exhausted"):
                cache.get_many(keys)

            async def aget_many() -> None:
                try:
                    with pytest.raises(rcache.BackendUnavailableError):
                        await cache.aget_many(keys)
                finally:
                    await cache.aclose()

            asyncio.run(aget_many())
            for node in (src, dst):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            assert cache.get_many(keys) == {"{x}a": 1}
            # the slot is served by nobody: CLUSTERDOWN
            src.execute_command("CLUSTER DELSLOTS", slot)
            with pytest.raises(rcache.BackendUnavailableError, match="ClusterDown"):
                cache.get("{x}a")
            # under "bypass" the same outage is a miss, counted
            bypass = rcache.Cache(cluster.url, prefix="t", ttl=60)
            assert bypass.get("{x}a") is None
            errors = [e for e in bypass.metrics.counts if e[0] == "cache_errors"]  # type: ignore[attr-defined]
            assert errors, "the bypassed outage is counted"
            bypass.close()
        finally:
            src.close()
            dst.close()
            cache.close()


def test_an_invalidation_a_dead_primary_cut_short_raises() -> None:
    with RedisCluster() as cluster:
        cache = rcache.Cache(cluster.url, prefix="t", ttl=60, breaker=NEVER_OPENS)
        stamps = cache.keyspace.tag_stamps("user:1")
        admin = cluster.client()
        try:
            for key in stamps:
                admin.set(key, "s")
            victim = cluster.kill_primary(cluster.node_for(stamps[0]))
            start = time.monotonic()
            with pytest.raises(rcache.BackendUnavailableError) as info:
                cache.invalidate_tags("user:1")
            assert "reached all 256 slot groups" in str(info.value)
            assert "call it again" in str(info.value)

            async def ainvalidate() -> None:
                try:
                    with pytest.raises(rcache.BackendUnavailableError):
                        await cache.ainvalidate_tags("user:1")
                finally:
                    await cache.aclose()

            asyncio.run(ainvalidate())
            print(f"raised within {time.monotonic() - start:.2f}s")
            # once the replica took over, the same call completes every group
            cluster.wait_promoted(victim)

            def done() -> bool:
                try:
                    cache.invalidate_tags("user:1")
                except rcache.BackendUnavailableError:
                    return False
                return True

            wait_until(done, timeout=15, interval=0.1, message="invalidated")
            assert not any(admin.exists(k) for k in stamps)
        finally:
            admin.close()
            cache.close()
