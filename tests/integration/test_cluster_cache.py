"""Every cache feature on a real local Redis Cluster (slot groups, issue 15).

The session cluster (3 primaries, 3 replicas, flushed after each test) serves the
behaviour tests; the fault tests start a cluster of their own, because they kill,
migrate or unassign what they test.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import rcache
import rcache._redis
from rcache import spi
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
    cluster_url: str, policy: Any
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


def test_an_invalidation_follows_a_slot_that_moved_since_the_map_was_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-node delete script fails on a key its node no longer serves ("non local
    key"); those copies are then deleted one by one, following MOVED."""
    one_by_one: list[list[str]] = []
    delete_each = rcache._redis.delete_each

    def spy(client: Any, keys: list[str]) -> Any:
        one_by_one.append(list(keys))
        return delete_each(client, keys)

    monkeypatch.setattr(rcache._redis, "delete_each", spy)
    with RedisCluster(replicas=0) as cluster:
        cache = rcache.Cache(cluster.url, prefix="t", ttl=60, on_backend_error="raise")
        assert cache.invalidate_tags("t") == 0  # the client has read the slot map
        moved = cache.keyspace.tag_stamp("t", 7)
        slot = _slot(moved)
        source = cluster.node_for(moved)
        target = next(n for n in cluster.primaries() if n.port != source.port)
        clients = _primaries(cluster)
        try:
            target_id = target.client().execute_command("CLUSTER MYID").decode()
            for c in clients:  # the slot is empty: hand it over without MIGRATE
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
            fresh = cluster.client()
            wait_until(
                lambda: cluster.node_for(moved).port == target.port,
                timeout=10,
                message="the slot moved",
            )
            fresh.set(moved, "s")  # written where the slot is now
            assert cache.invalidate_tags("t") == 1  # with the old map
            assert not fresh.exists(moved)
            # the source node's copies went one by one (the moved one among them)
            assert len(one_by_one) == 1 and moved in one_by_one[0]
            fresh.close()
        finally:
            for c in clients:
                c.close()
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


# -- the read-through on the cluster ------------------------------------------------------


def _primaries(cluster: RedisCluster) -> list[redis.Redis]:
    return [node.client() for node in cluster.primaries()]


def _calls(clients: list[redis.Redis], command: str) -> int:
    """How many times the primaries ran ``command`` since their stats were reset."""
    total = 0
    for c in clients:
        stats = c.info("commandstats").get(f"cmdstat_{command}")
        total += int(stats["calls"]) if stats else 0
    return total


def test_every_key_of_an_entry_is_on_one_node_with_braces_in_the_names(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    runs = []

    @cache.cached(name="m.{odd}", tags=["t{{a}}:{x}", "all"])  # a literal {a}
    def f(x: str) -> str:
        runs.append(x)
        return x.upper()

    args = ["{z}", "a}b", "{", "}{", "plain"]
    assert [f(a) for a in args] == [a.upper() for a in args]
    assert [f(a) for a in args] == [a.upper() for a in args]  # hits
    assert runs == args
    ks = cache.keyspace
    found = set()
    for c in _primaries(redis_cluster):
        found.update(k.decode() for k in c.keys("t:*"))
        c.close()
    expected = {"t:cluster:groups"}
    for a in args:
        value = f.key_for(a)
        group = ks.group_of_key(value)
        assert group is not None
        entry = [
            value,
            ks.function_stamp("m.{odd}", group),
            ks.tag_stamp(f"t{{a}}:{cache_tag(a)}", group),
            ks.tag_stamp("all", group),
        ]
        assert len({_slot(k) for k in entry}) == 1
        assert len({redis_cluster.node_for(k).port for k in entry}) == 1
        expected.update(entry)
    # the value, and the group's copies of the stamps: nothing else stays
    assert found - {k for k in found if k.endswith(":ready")} == expected


def cache_tag(value: str) -> str:
    """How a tag template renders a str field (see rcache._keys)."""
    from rcache._keys import template_field

    return template_field(value)


def test_a_hit_is_one_mget_on_the_entrys_node(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    @cache.cached(tags=["user:{uid}", "users"])
    def user(uid: int) -> dict[str, int]:
        return {"uid": uid}

    user(1)
    user(1)  # Redis's clock is known from here: a hit is one plain MGET
    clients = _primaries(redis_cluster)
    try:
        for c in clients:
            c.config_resetstat()
        for _ in range(10):
            assert user(1) == {"uid": 1}
        node = redis_cluster.node_for(user.key_for(1))
        per_node = {
            c.connection_pool.connection_kwargs["port"]: _calls([c], "mget")
            for c in clients
        }
        assert per_node[node.port] == 10
        assert sum(per_node.values()) == 10  # the stamps came with the value
        assert _calls(clients, "evalsha") == 0
    finally:
        for c in clients:
            c.close()


async def test_a_tag_is_invalidated_in_every_group(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    runs: list[int] = []

    @cache.cached(tags=["users"])
    def user(uid: int) -> int:
        runs.append(uid)
        return uid

    @cache.cached(tags=["users"])
    async def auser(uid: int) -> int:
        runs.append(-uid)
        return uid

    ids = range(120)
    groups = {cache.keyspace.group_of_key(user.key_for(i)) for i in ids}
    assert len(groups) > 60  # the entries really span many groups and all 3 nodes
    assert [user(i) for i in ids] == list(ids)
    assert [await auser(i) for i in ids] == list(ids)
    assert len(runs) == 240
    assert [user(i) for i in ids] == list(ids)  # all hits
    assert len(runs) == 240
    assert cache.invalidate_tags("nobody") == 0  # loads the script on every node
    clients = _primaries(redis_cluster)
    try:
        for c in clients:
            c.config_resetstat()
        assert cache.invalidate_tags("users") == 1
        # one command per node (cluster_delete.lua), every node at once, deleting the
        # node's copies: B DELs in all, O(B) not O(entries)
        assert _calls(clients, "evalsha") == len(clients)
        assert _calls(clients, "del") == 256
    finally:
        for c in clients:
            c.close()
    assert [user(i) for i in ids] == list(ids)
    assert len(runs) == 360  # every entry, in every group, recomputed
    assert await cache.ainvalidate_tags("users", "nobody") == 1
    assert [await auser(i) for i in ids] == list(ids)
    assert len(runs) == 480
    # invalidate_all: the function's stamp copies, every group
    assert user.invalidate_all()
    assert not user.invalidate_all()  # no copy left
    assert [user(i) for i in ids] == list(ids)
    assert len(runs) == 600
    assert await auser.invalidate_all()
    await cache.aclose()


def test_claim_invalidate_store_is_rejected(cache: rcache.Cache) -> None:
    """A computation that an invalidation raced stores nothing: the claim, the
    invalidation of every group and the store meet in the entry's slot."""
    runs = []

    @cache.cached(tags=["catalog"])
    def price(sku: int) -> int:
        runs.append(sku)
        if len(runs) == 1:
            cache.invalidate_tags("catalog")  # between the claim and the store
        return len(runs)

    assert price(1) == 1  # served to its caller...
    assert (
        cache.metrics.count(  # type: ignore[attr-defined]
            "cache_errors",
            price.__wrapped__.__module__ + "." + price.__qualname__,
            "set",
            "InvalidatedDuringLoad",
        )
        == 1
    )
    assert price(1) == 2  # ...but not stored under the old stamp
    assert price(1) == 2


def test_batches_split_by_group(
    redis_cluster: RedisCluster, cache: rcache.Cache
) -> None:
    calls: list[list[int]] = []

    @cache.cached_batch(name="users")
    def users(ids: list[int]) -> dict[int, str]:
        calls.append(sorted(ids))
        return {i: f"u{i}" for i in ids if i != 13}  # 13 is never cached

    ids = list(range(40))
    assert len({cache.keyspace.group_of_key(k) for k in users.keys_for(ids)}) > 20
    assert users(ids) == {i: f"u{i}" for i in ids if i != 13}
    assert calls == [ids]  # one call for every missing id, whatever their group
    clients = _primaries(redis_cluster)
    try:
        for c in clients:
            c.config_resetstat()
        assert users([*ids, 40]) == {i: f"u{i}" for i in [*ids, 40] if i != 13}
        assert calls[1:] == [[13, 40]]
        # one MGET per group read (pipelined per node), one store per group stored
        groups = {cache.keyspace.group_of_key(k) for k in users.keys_for([*ids, 40])}
        assert _calls(clients, "mget") == len(groups)
    finally:
        for c in clients:
            c.close()
    assert users.invalidate([1, 2]) == 2
    assert users([1, 2, 3]) == {1: "u1", 2: "u2", 3: "u3"}
    assert calls[2:] == [[1, 2]]
    assert users.invalidate_all()
    assert users(ids[:10]) == {i: f"u{i}" for i in range(10)}
    assert calls[3:] == [list(range(10))]


def test_a_raced_batch_stores_nothing(cache: rcache.Cache) -> None:
    calls = []

    @cache.cached_batch(name="raced")
    def raced(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        if len(calls) == 1:
            raced.invalidate_all()  # every group's stamp changes mid-computation
        return {i: len(calls) for i in ids}

    assert raced([1, 2, 3, 4]) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert raced([1, 2, 3, 4]) == {1: 2, 2: 2, 3: 2, 4: 2}
    assert raced([1, 2, 3, 4]) == {1: 2, 2: 2, 3: 2, 4: 2}  # stored this time
    assert len(calls) == 2


async def test_async_batches_split_by_group(cache: rcache.Cache) -> None:
    calls = []

    @cache.cached_batch(name="ausers")
    async def ausers(ids: list[int]) -> dict[int, int]:
        calls.append(sorted(ids))
        return {i: -i for i in ids}

    assert await ausers(list(range(30))) == {i: -i for i in range(30)}
    assert await ausers(list(range(32))) == {i: -i for i in range(32)}
    assert calls == [list(range(30)), [30, 31]]
    assert await ausers.invalidate_all()
    assert await ausers([5]) == {5: -5}
    assert calls[2:] == [[5]]
    await cache.aclose()


def test_metrics_count_as_on_one_primary(cluster_url: str) -> None:
    metrics = rcache.InMemoryMetrics()
    cache = rcache.Cache(cluster_url, prefix="t", ttl=60, metrics=metrics)

    @cache.cached(name="m.f", tags=["t"])
    def f(x: int) -> int:
        return x

    for x in (1, 2, 1, 2, 1):
        f(x)
    cache.invalidate_tags("t")
    f(1)
    cache.set("k", 1)
    cache.get("k")
    cache.get("nope")
    assert metrics.count("cache_gets", "m.f", "miss") == 3
    assert metrics.count("cache_gets", "m.f", "hit") == 3
    assert metrics.count("cache_puts", "m.f") == 3
    assert metrics.count("cache_loads", "m.f", "success") == 3
    assert metrics.count("cache_gets", "t", "hit") == 1
    assert metrics.count("cache_gets", "t", "miss") == 1
    assert not [e for e in metrics.counts if e[0] == "cache_errors"]
    cache.close()


# -- across processes, and through a failover -----------------------------------------------

CTX = mp.get_context("fork")


def _stampede_worker(url: str, callers: int, barrier: Any, out: Any) -> None:
    cache = rcache.Cache(url, prefix="st")

    @cache.cached(ttl=60, name="slow", tags=["catalog"])
    def slow(x: int) -> dict[str, int]:
        spi.run(cache, lambda c: c.incr("{st}:runs"))
        time.sleep(0.2)
        return {"x": x}

    results: list[Any] = []
    barrier.wait()
    threads = [
        threading.Thread(target=lambda: results.append(slow(1))) for _ in range(callers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def test_a_cold_key_runs_once_across_four_processes(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    procs, callers = 4, 25
    barrier = CTX.Barrier(procs)
    out = CTX.Queue()
    workers = [
        CTX.Process(target=_stampede_worker, args=(cluster_url, callers, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    client = redis_cluster.client()
    try:
        assert int(client.get("{st}:runs") or 0) == 1  # the function ran once in all
    finally:
        client.close()
    assert all(r == [{"x": 1}] * callers for r in results)


def test_waiters_recover_when_the_entrys_primary_is_sigkilled() -> None:
    """A computation's lease, its waiters' BLMOVE and its store all live on the
    entry's primary. SIGKILL it mid-computation: every caller still gets the value
    (computed without the cache while the slot has no primary), and once the replica
    took over the cache serves hits again."""
    with RedisCluster() as cluster:
        cache = rcache.Cache(cluster.url, prefix="t", ttl=60)
        runs: list[int] = []
        computing = threading.Event()
        go_on = threading.Event()

        @cache.cached(name="slow", lease_ttl=5, wait=20)
        def slow(x: int) -> int:
            runs.append(x)
            if len(runs) == 1:
                computing.set()
                go_on.wait(20)
            return x * 2

        key = slow.key_for(7)
        primary = cluster.node_for(key)
        results: list[int] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                results.append(slow(7))
            except BaseException as exc:  # any escape fails the test below
                errors.append(exc)

        # one process's callers share a flight: the waiters across processes are
        # other Caches (each its own clients, blocked in BLMOVE on the primary)
        others = [rcache.Cache(cluster.url, prefix="t", ttl=60) for _ in range(3)]
        leader = threading.Thread(target=call)
        leader.start()
        assert computing.wait(10)
        waiters = []
        for other in others:
            f = other.cached(name="slow", lease_ttl=5, wait=20)(lambda x: x * 2)
            waiters.append(threading.Thread(target=lambda f=f: results.append(f(7))))
        for t in waiters:
            t.start()
        admin = primary.client()
        try:
            wait_until(
                lambda: (
                    sum(
                        1
                        for c in admin.client_list()
                        if c.get("cmd") == "blmove" and "b" in c.get("flags", "")
                    )
                    == len(others)
                ),
                timeout=10,
                message="waiters blocked on the entry's primary",
            )
        finally:
            admin.close()
        killed = time.monotonic()
        cluster.kill_primary(primary)
        go_on.set()
        for t in [leader, *waiters]:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in [leader, *waiters])
        assert results == [14] * (1 + len(others))
        print(f"every caller answered {time.monotonic() - killed:.2f}s after SIGKILL")
        cluster.wait_promoted(primary)

        count = cache.metrics.count  # type: ignore[attr-defined]

        def hits_again() -> bool:
            before = count("cache_gets", "slow", "hit")
            assert slow(7) == 14 and slow(7) == 14
            return bool(count("cache_gets", "slow", "hit") > before)

        wait_until(hits_again, timeout=20, interval=0.1, message="hits again")
        for c in [cache, *others]:
            c.close()
