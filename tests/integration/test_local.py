"""The local tier against a real redis-server: tracked reads, invalidations, flushes.

Every invalidation path of issue 16 on the server the suite runs (Redis 7.0 by default;
``RCACHE_TEST_SERVER=redis8|valkey9``): another client's write, delete and expiry; stamp
keys; FLUSHALL/FLUSHDB; a killed listener; a restarted server; tracking-table overflow;
the sequence guard's race (with the guard and without it, so the test can fail); a
forked child. Waits poll with deadlines (``wait_until``).

The tests on the session server run on the Redis Cluster fixture too (a listener per
primary): what they write from outside names the keys through the Cache
(``rkey``, ``KeySpace``), which on the cluster carry slot groups. The tests marked
``single_server`` are facts of one server's listener; the cluster's own (a write on
each primary, one node's listener killed, a failover, MOVED) are at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

import rcache
from rcache import ConfigurationError, LocalTier
from rcache._flow import Flow
from rcache._local import MISSING, Invalidations, LocalStore, args_key
from rcache._serializers import encode_envelope, resolve_serializer
from rcache._tracking import ClusterListeners, Tier
from rcache.testing import RedisCluster, RedisSentinel, RedisServer, wait_until

pytestmark = pytest.mark.topologies("single", "cluster")

#: how soon another client's write must drop a local entry (issue 16: "within 50 ms")
WITHIN = 0.05


def envelope(value: Any, ttl: float = 60.0) -> bytes:
    """What ``Cache.set`` writes, for writers that are plain redis-py clients."""
    return encode_envelope(resolve_serializer("json"), value, fresh_for=ttl)


def rkey(cache: rcache.Cache, key: str) -> str:
    """The Redis key of ``cache``'s explicit ``key`` (on the cluster: in its group)."""
    return cache._key(key)


def tier_of(cache: rcache.Cache) -> Tier:
    """The Cache's shared tier, its listener subscribed."""
    tier = cache._local_tier(cache._local_option(True))
    assert tier is not None
    assert tier.listener.guard.ready.wait(5), "the listener did not subscribe"
    return tier


def held(tier: Tier, key: Any) -> Any:
    return tier.store.get(key)


def warm(cache: rcache.Cache, key: str, value: Any) -> Tier:
    """Read ``key`` until it is held locally (the first read may come before the
    listener subscribed)."""
    tier = tier_of(cache)
    wait_until(
        lambda: cache.get(key) == value and held(tier, key) == value,
        timeout=5,
        message=f"{key} held locally",
    )
    return tier


def dropped_within(tier: Tier, key: Any, timeout: float) -> float:
    start = time.perf_counter()
    wait_until(lambda: held(tier, key) is MISSING, timeout=timeout, interval=0.0002)
    return time.perf_counter() - start


@pytest.fixture
async def lcache(redis_url: str) -> AsyncIterator[rcache.Cache]:
    c = rcache.Cache(redis_url, prefix="test", ttl=60, local=LocalTier(ttl=30))
    yield c
    await c.aclose()
    c.close()


@pytest.fixture
def writer(redis_client: redis.Redis) -> redis.Redis:
    """Another client (a plain redis-py one: not this process's rcache)."""
    return redis_client


# -- reads and hits ------------------------------------------------------------------


def test_a_tracked_read_is_then_served_locally(lcache: rcache.Cache) -> None:
    lcache.set("k", {"a": 1})
    tier = warm(lcache, "k", {"a": 1})
    before = lcache.metrics.count("cache_gets", "test", "local_hit")  # type: ignore[attr-defined]
    value = lcache.get("k")
    assert value == {"a": 1} and value is held(tier, "k")  # the same object
    assert lcache.metrics.count("cache_gets", "test", "local_hit") == before + 1  # type: ignore[attr-defined]
    assert lcache.get("k", local=False) == {"a": 1}  # per call: ask Redis
    assert lcache.get("missing", "dflt") == "dflt"
    assert held(tier, "missing") is MISSING  # misses are not held


def test_local_is_off_unless_asked(redis_url: str) -> None:
    c = rcache.Cache(redis_url, prefix="test", ttl=60)
    try:
        c.set("k", 1)
        assert c.get("k") == 1 and c._local_shared is None
        assert not any(t.name == "rcache-tracking" for t in threading.enumerate()) or (
            c._local_tiers == []
        )
        tier = tier_of(c)  # local=True per call uses the Cache's shared tier
        wait_until(lambda: c.get("k", local=True) == 1 and held(tier, "k") == 1)
    finally:
        c.close()


async def test_async_reads_use_the_tier_too(lcache: rcache.Cache, writer: Any) -> None:
    await lcache.aset("k", [1, 2])
    tier = tier_of(lcache)
    deadline = time.monotonic() + 5
    while held(tier, "k") != [1, 2] and time.monotonic() < deadline:
        assert await lcache.aget("k") == [1, 2]
    assert held(tier, "k") == [1, 2]
    writer.set(rkey(lcache, "k"), envelope([3]))
    dropped_within(tier, "k", 1)
    assert await lcache.aget("k") == [3]


def test_an_entry_expires_with_its_value(lcache: rcache.Cache) -> None:
    lcache.set("k", 1, ttl=0.3)
    tier = warm(lcache, "k", 1)
    entry = tier.store._data["k"]
    assert (
        entry.expires - time.monotonic() < 0.31
    )  # its own expiry, not the tier's 30 s


# -- invalidations by another client -------------------------------------------------------


@pytest.mark.parametrize("op", ["write", "delete", "rename", "expire"])
def test_another_clients_change_drops_the_entry(
    lcache: rcache.Cache, writer: redis.Redis, op: str
) -> None:
    # the value says "fresh for 60 s"; only Redis's key expiry (op "expire") ends it
    key = rkey(lcache, "k")
    writer.set(key, envelope("old"), px=400 if op == "expire" else None)
    tier = warm(lcache, "k", "old")
    if op == "write":
        writer.set(key, envelope("new"))
    elif op == "delete":
        writer.delete(key)
    elif op == "rename":
        writer.rename(key, key + ":elsewhere")  # the same slot on the cluster
    # an expiry is noticed by Redis's own expire cycle (up to ~100 ms after it)
    elapsed = dropped_within(tier, "k", 2.0 if op == "expire" else 1.0)
    if op != "expire":
        assert elapsed < WITHIN, elapsed
    assert lcache.get("k") == ("new" if op == "write" else None)


def _read_into(cache: rcache.Cache, tier: Tier, local_key: Any, keys: list[str]) -> Any:
    """A tracked MGET of ``keys`` stored under ``local_key`` (how a decorated entry with
    its function and tag stamps is read)."""
    token = tier.store.begin(keys)

    def flow() -> Flow[Any]:
        return (yield tier.read(token, ("MGET", *keys), None))

    rows = cache._driver.drive(flow())
    tier.store.store(token, local_key, rows)
    return rows


def test_a_stamp_invalidation_drops_every_entry_reading_it(
    lcache: rcache.Cache, writer: redis.Redis
) -> None:
    tier = tier_of(lcache)
    # one hash tag: the keys of an entry share a slot on the cluster
    v1, v2, fn, x, y = ("{e}v:1", "{e}v:2", "{e}s:fn", "{e}s:t:x", "{e}s:t:y")
    writer.mset({v1: b"a", v2: b"b", fn: b"1", x: b"2", y: b"3"})
    wait_until(
        lambda: (
            _read_into(lcache, tier, ("f", 1), [v1, fn, x])
            and held(tier, ("f", 1)) is not MISSING
        )
    )
    _read_into(lcache, tier, ("f", 2), [v2, fn, y])
    assert len(tier.store) == 2
    writer.delete(x)  # a tag stamp: one entry
    dropped_within(tier, ("f", 1), 1)
    assert held(tier, ("f", 2)) is not MISSING
    _read_into(lcache, tier, ("f", 1), [v1, fn, y])
    writer.set(fn, b"9")  # the function stamp: both
    dropped_within(tier, ("f", 1), 1)
    dropped_within(tier, ("f", 2), 1)


def test_invalidate_tags_drops_local_copies_at_once(lcache: rcache.Cache) -> None:
    tier = tier_of(lcache)
    stamp = lcache.keyspace.tag_stamps("users")[0]  # on the cluster: group 0's copy
    lcache._sync.client.set(stamp, b"1")
    wait_until(
        lambda: (
            _read_into(lcache, tier, "e", [stamp]) and held(tier, "e") is not MISSING
        )
    )
    lcache.invalidate_tags("users")  # this process's own write: no wait for Redis
    assert held(tier, "e") is MISSING


def test_own_writes_are_read_back_at_once(lcache: rcache.Cache) -> None:
    lcache.set("k", 0)
    warm(lcache, "k", 0)
    for i in range(1, 200):  # each set drops the local copy before it returns
        lcache.set("k", i)
        assert lcache.get("k") == i
        assert lcache.get("k") == i
    lcache.delete("k")
    assert lcache.get("k") is None
    lcache.set_many({"k": "m"})
    assert lcache.get("k") == "m"


def test_a_write_through_another_cache_of_this_process_drops_at_once(
    lcache: rcache.Cache, redis_url: str
) -> None:
    lcache.set("k", 1)
    tier = warm(lcache, "k", 1)
    other = rcache.Cache(redis_url, prefix="test", ttl=60)  # no local tier of its own
    try:
        other.set("k", 2)
        assert held(tier, "k") is MISSING  # dropped before set() returned
    finally:
        other.close()


# -- flushes -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["FLUSHALL", "FLUSHDB"])
def test_flushall_and_flushdb_flush_the_tier(
    lcache: rcache.Cache, writer: redis.Redis, command: str
) -> None:
    lcache.set("k", 1)
    tier = warm(lcache, "k", 1)
    writer.execute_command(command)
    wait_until(lambda: len(tier.store) == 0, timeout=1)
    assert tier.listener.guard.flushes.get("flushall", 0) >= 1
    assert lcache.metrics.count("local_flushes", "test", "flushall") >= 1  # type: ignore[attr-defined]
    assert lcache.get("k") is None


@pytest.mark.single_server  # one listener; the cluster's: test_a_killed_node_listener_...
def test_a_killed_listener_flushes_then_recovers(
    lcache: rcache.Cache, writer: redis.Redis
) -> None:
    lcache.set("k", "old")
    tier = warm(lcache, "k", "old")
    first_id = tier.listener.client_id
    # the listener is killed and a write lands before it is back: its invalidation
    # is lost, so only the flush keeps the old value from being served
    writer.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    writer.set("test:k:k", envelope("during the gap"))
    wait_until(lambda: tier.listener.losses >= 1, timeout=2)
    assert held(tier, "k") is MISSING
    assert lcache.get("k") == "during the gap"
    wait_until(lambda: tier.listener.guard.ready.is_set(), timeout=5)
    assert tier.listener.client_id not in (None, first_id)
    tier = warm(lcache, "k", "during the gap")
    writer.set("test:k:k", envelope("after"))  # invalidations work again
    dropped_within(tier, "k", 1)
    assert lcache.get("k") == "after"
    assert lcache.metrics.count("local_flushes", "test", "disconnect") >= 1  # type: ignore[attr-defined]


def test_a_server_restart_flushes(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test", ttl=60, local=True)
    try:
        cache.set("k", 1)
        tier = warm(cache, "k", 1)
        server.restart()  # the dataset is gone: "k" must not be served
        wait_until(lambda: len(tier.store) == 0, timeout=2)
        assert cache.get("k") is None
        wait_until(lambda: tier.listener.guard.ready.is_set(), timeout=5)
        cache.set("k", 2)
        tier = warm(cache, "k", 2)
        server.client().set("test:k:k", envelope(3))
        dropped_within(tier, "k", 1)
    finally:
        cache.close()


def test_tracking_table_overflow_drops_the_keys_redis_forgets(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    server.client().config_set("tracking-table-max-keys", 10)
    cache = rcache.Cache(server.url, prefix="test", ttl=60, local=True)
    try:
        cache.set_many({f"k{i}": i for i in range(40)})
        tier = tier_of(cache)
        for i in range(40):
            cache.get(f"k{i}")
        # Redis keeps 10 keys tracked and sends the others as invalidated
        wait_until(lambda: len(tier.store) <= 10, timeout=2)
        assert tier.listener.guard.received >= 30
    finally:
        cache.close()


# -- the sequence guard ----------------------------------------------------------------


@pytest.mark.parametrize("guarded", [True, False], ids=["guard", "no-guard"])
def test_a_write_between_reply_and_store_is_never_kept(
    lcache: rcache.Cache,
    writer: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    guarded: bool,
) -> None:
    """The race of cashews client_side: the reply is in, another client rewrites the
    key and its invalidation reaches the listener, and only then is the reply stored.
    The injected delay between reply and store lasts until that invalidation arrived.
    40 rounds: with the guard none ends stale; without it (the negative control, the
    epoch still checked) they do."""
    tier = tier_of(lcache)
    guard = tier.listener.guard
    if not guarded:

        def epoch_only(self: Invalidations, token: Any) -> bool:
            return bool(token.ok and token.epoch == self.state[0])

        monkeypatch.setattr(Invalidations, "admit", epoch_only)
    store_now = LocalStore.store
    rewrite: list[tuple[str, str]] = []

    def delayed_store(
        self: LocalStore, token: Any, key: Any, value: Any, **kw: Any
    ) -> bool:
        received = guard.received
        writer.set(*rewrite[-1])
        wait_until(lambda: guard.received > received, timeout=2, interval=0.0001)
        return store_now(self, token, key, value, **kw)

    monkeypatch.setattr(LocalStore, "store", delayed_store)
    stale = 0
    for i in range(40):
        key = f"race{i}"  # a stale entry is never invalidated again: one key per round
        writer.set(rkey(lcache, key), envelope("old"))
        rewrite.append((rkey(lcache, key), envelope("new")))
        assert lcache.get(key) == "old"  # the reply; the rewrite lands after it
        if held(tier, key) == "old":
            stale += 1  # kept although its invalidation has passed: served until ttl
            assert lcache.get(key) == "old"
            assert lcache.get(key, local=False) == "new"
    print(f"guard={guarded}: {stale} stale rounds of 40")
    if guarded:
        assert stale == 0
        assert tier.store.refused >= 40
    else:
        assert stale > 0  # the control: the test can fail


# -- processes ---------------------------------------------------------------------------


def test_a_forked_child_starts_empty(lcache: rcache.Cache, writer: redis.Redis) -> None:
    lcache.set("k", "parent")
    tier = warm(lcache, "k", "parent")
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        report: dict[str, Any] = {}
        try:
            report["empty"] = len(tier.store) == 0 and held(tier, "k") is MISSING
            report["id"] = tier.listener.client_id
            report["read"] = lcache.get("k")
            report["ready"] = tier.listener.guard.ready.wait(5)
            wait_until(lambda: lcache.get("k") and held(tier, "k") == "parent")
            report["held"] = True
            report["own"] = tier.listener.client_id
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(write_fd, json.dumps(report).encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert report == {
        "empty": True,
        "id": None,
        "read": "parent",
        "ready": True,
        "held": True,
        "own": report.get("own"),
    }, report
    assert report["own"] not in (None, tier.listener.client_id)  # its own listener
    assert held(tier, "k") == "parent"  # the parent's tier is untouched
    writer.set(rkey(lcache, "k"), envelope("new"))
    dropped_within(tier, "k", 1)


# -- configuration and bounds -------------------------------------------------------------


@pytest.mark.single_server  # the cluster's: test_a_write_on_each_primary_invalidates
def test_one_thread_and_one_listener_per_server(redis_url: str) -> None:
    a = rcache.Cache(redis_url, prefix="a", local=True)
    b = rcache.Cache(redis_url, prefix="b", local=LocalTier(max_entries=5))
    try:
        ta, tb = tier_of(a), tier_of(b)
        assert ta.listener is tb.listener and ta.store is not tb.store
        threads = [t for t in threading.enumerate() if t.name == "rcache-tracking"]
        assert len(threads) == 1 and threads[0].daemon
        names = [c["name"] for c in a._sync.client.client_list()]
        assert names.count("rcache-invalidations") == 1
    finally:
        a.close()
        b.close()
    # no store left: the listener closes and the thread ends
    wait_until(
        lambda: not any(t.name == "rcache-tracking" for t in threading.enumerate()),
        timeout=5,
    )


def test_entries_stay_bounded(redis_url: str) -> None:
    cache = rcache.Cache(
        redis_url, prefix="test", ttl=60, local=LocalTier(max_entries=50)
    )
    try:
        cache.set_many({f"k{i}": i for i in range(500)})
        tier = tier_of(cache)
        for i in range(500):
            assert cache.get(f"k{i}") == i
        assert len(tier.store) == 50
        assert len(tier.store._index) == 50
        assert cache.metrics.local["test"] == 50  # type: ignore[attr-defined]
    finally:
        cache.close()


def test_memory_urls_and_bad_options(redis_url: str) -> None:
    mem = rcache.Cache("memory://", prefix="m", ttl=60, local=True)
    mem.set("k", 1)
    assert mem.get("k") == 1 and mem.get("k") == 1  # the store is in-process already
    assert mem._local_tiers == []
    with pytest.raises(ConfigurationError, match="LocalTier"):
        rcache.Cache(redis_url, local=5)  # type: ignore[arg-type]


@pytest.fixture
def down_url() -> str:
    server = RedisServer().start()
    url = server.url
    server.close()
    return url


def test_a_listener_that_cannot_connect_leaves_reads_to_redis(down_url: str) -> None:
    cache = rcache.Cache(down_url, prefix="test", ttl=60, local=True)
    try:
        assert cache.get("k", "dflt") == "dflt"  # bypassed, as without a tier
        tier = cache._local_shared
        assert tier is not None and len(tier.store) == 0
        assert not tier.listener.guard.ready.is_set()
    finally:
        cache.close()


@pytest.mark.slow
def test_a_sentinel_failover_flushes_and_the_tier_follows_the_new_primary() -> None:
    with RedisSentinel() as sentinels:
        cache = rcache.Cache(sentinels.url, prefix="test", ttl=60, local=True)
        try:
            cache.set("k", 1)
            tier = warm(cache, "k", 1)
            old = sentinels.primary_port()
            sentinels.kill_primary()
            wait_until(lambda: len(tier.store) == 0, timeout=2)  # the listener's EOF
            new = sentinels.wait_failover(old)
            wait_until(lambda: tier.listener.guard.ready.is_set(), timeout=15)
            cache.set("k", 2)
            tier = warm(cache, "k", 2)
            new.client().set("test:k:k", envelope(3))  # on the new primary
            dropped_within(tier, "k", 1)
            assert cache.get("k") == 3
        finally:
            cache.close()


@pytest.mark.slow
def test_a_server_that_hangs_does_not_delay_another_servers_invalidations(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    healthy, hung = redis_server_factory(), redis_server_factory()
    a = rcache.Cache(healthy.url, prefix="test", ttl=60, local=True)
    b = rcache.Cache(hung.url, prefix="test", ttl=60, local=True)
    try:
        tier_b = tier_of(b)
        hung.pause()  # SIGSTOP: connects hang until their timeout (1 s)
        wait_until(lambda: tier_b.listener.losses >= 1, timeout=5)  # no PONG
        writer = healthy.client()
        deadline = time.monotonic() + 3  # several reconnects to the hung server
        n = 0
        while time.monotonic() < deadline:
            a.set(f"k{n}", n)
            tier_a = warm(a, f"k{n}", n)
            writer.set(f"test:k:k{n}", envelope(-n))
            assert dropped_within(tier_a, f"k{n}", 1) < WITHIN
            n += 1
        assert tier_b.listener.connecting or not tier_b.listener.connected
        writer.close()
    finally:
        hung.resume()
        a.close()
        b.close()


def test_prometheus_metrics_of_the_tier(redis_url: str, writer: redis.Redis) -> None:
    from prometheus_client import CollectorRegistry

    from rcache.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    cache = rcache.Cache(
        redis_url,
        prefix="test",
        ttl=60,
        local=True,
        metrics=PrometheusMetrics(registry),
    )

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, {"cache": "test", **labels})
        return 0.0 if got is None else got

    try:
        assert value("rcache_cache_gets_total", result="local_hit") == 0  # pre-created
        cache.set("k", 1)
        tier = warm(cache, "k", 1)
        cache.get("k")
        assert value("rcache_cache_gets_total", result="local_hit") >= 1
        assert value("rcache_local_entries") == 1
        writer.set(rkey(cache, "k"), envelope(2))
        dropped_within(tier, "k", 1)
        wait_until(lambda: value("rcache_local_invalidations_total") >= 1)
        assert value("rcache_local_entries") == 0
        writer.flushall()
        wait_until(lambda: value("rcache_local_flushes_total", reason="flushall") >= 1)
        # one per server where a tracked read ran (on the cluster: "k"'s primary)
        assert value("rcache_local_flushes_total", reason="flushall") == 1
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ("&* +@all -client|tracking", "CLIENT TRACKING"),
        ("resetchannels +@all", "subscribe to invalidations"),
    ],
    ids=["no-tracking", "no-channel"],
)
def test_without_the_acl_permissions_reads_go_to_redis(
    redis_server_factory: Callable[[], RedisServer],
    caplog: pytest.LogCaptureFixture,
    rules: str,
    says: str,
) -> None:
    server = redis_server_factory()
    server.client().execute_command(
        "ACL", "SETUSER", "app", "on", ">pw", "~*", *rules.split()
    )
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    cache = rcache.Cache(url, prefix="test", ttl=60, local=True)
    try:
        cache.set("k", 1)
        for _ in range(20):
            assert cache.get("k") == 1
        tier = cache._local_shared
        assert tier is not None and len(tier.store) == 0
        wait_until(lambda: says in caplog.text, timeout=5)
        cache.set("k", 2)
        assert cache.get("k") == 2
    finally:
        cache.close()


# -- the decorated path ------------------------------------------------------------------


def _held_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call until the call is a local hit (the first fills Redis, the next reads it
    tracked and keeps it)."""
    spec = fn._spec
    tier = spec.local_tier()
    assert tier is not None and tier.listener.guard.ready.wait(5)
    metrics = spec.cache.metrics
    before = metrics.count("cache_gets", spec.name, "local_hit")

    def hit() -> bool:
        fn(*args, **kwargs)
        return bool(metrics.count("cache_gets", spec.name, "local_hit") > before)

    wait_until(hit, timeout=5, message="a local hit")
    return tier


def test_a_decorated_function_hits_locally(
    lcache: rcache.Cache, writer: redis.Redis
) -> None:
    calls: list[int] = []

    @lcache.cached(ttl=60, name="users.get")
    def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id, "v": len(calls)}

    tier = _held_call(get_user, 7)
    value = get_user(7)
    assert value == {"id": 7, "v": 1} and calls == [7]
    assert get_user(7) is value  # the kept object
    assert get_user(True) == {"id": True, "v": 2}  # True is not 1: its own key
    writer.delete(get_user.key_for(7))  # another client
    dropped_within(tier, args_key(get_user._spec, (7,)), 1)  # type: ignore[attr-defined]
    assert get_user(7) == {"id": 7, "v": 3}


async def test_an_async_decorated_function_hits_locally(lcache: rcache.Cache) -> None:
    @lcache.cached(ttl=60, name="users.aget")
    async def aget_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    spec = aget_user._spec  # type: ignore[attr-defined]
    await aget_user(3)
    tier = spec.local_tier()
    assert tier.listener.guard.ready.wait(5)
    deadline = time.monotonic() + 5
    while held(tier, args_key(spec, (3,))) is MISSING and time.monotonic() < deadline:
        await aget_user(3)
    before = lcache.metrics.count("cache_gets", spec.name, "local_hit")  # type: ignore[attr-defined]
    assert await aget_user(3) == {"id": 3}
    assert lcache.metrics.count("cache_gets", spec.name, "local_hit") == before + 1  # type: ignore[attr-defined]
    await aget_user.invalidate(3)  # this process's own write: dropped at once
    assert held(tier, args_key(spec, (3,))) is MISSING


def test_stamps_drop_decorated_entries(
    lcache: rcache.Cache, writer: redis.Redis
) -> None:
    @lcache.cached(ttl=60, name="tagged", tags=["users", "user:{user_id}"])
    def tagged(user_id: int) -> int:
        return user_id

    spec = tagged._spec  # type: ignore[attr-defined]
    tier = _held_call(tagged, 1)
    _held_call(tagged, 2)
    # another process's invalidate_tags (on the cluster: every group's copy)
    writer.delete(*lcache.keyspace.tag_stamps("user:1"))
    dropped_within(tier, args_key(spec, (1,)), 1)
    assert held(tier, args_key(spec, (2,))) == 2
    _held_call(tagged, 1)
    lcache.invalidate_tags("users")  # in this process: at once, both
    assert held(tier, args_key(spec, (1,))) is MISSING
    assert held(tier, args_key(spec, (2,))) is MISSING
    _held_call(tagged, 1)
    tagged.invalidate_all()
    assert held(tier, args_key(spec, (1,))) is MISSING
    _held_call(tagged, 1)
    # the function stamp, from elsewhere
    writer.delete(*lcache.keyspace.function_stamps(spec.name))
    dropped_within(tier, args_key(spec, (1,)), 1)


def test_refresh_and_a_new_value_are_read_back_at_once(lcache: rcache.Cache) -> None:
    n = [0]

    @lcache.cached(ttl=60, name="counter")
    def counter(x: int) -> int:
        n[0] += 1
        return n[0]

    _held_call(counter, 1)
    assert counter(1) == 1
    assert counter.refresh(1) == 2
    assert counter(1) == 2  # no local copy of the old value survives the store


def test_stale_while_revalidate_behind_the_tier(lcache: rcache.Cache) -> None:
    n = [0]

    @lcache.cached(ttl=0.3, stale=30, name="swr")
    def swr(x: int) -> int:
        n[0] += 1
        return n[0]

    spec = swr._spec  # type: ignore[attr-defined]
    tier = _held_call(swr, 1)
    entry = tier.store._data[args_key(spec, (1,))]
    assert entry.expires - time.monotonic() <= 0.31  # ends with the value's freshness
    wait_until(lambda: held(tier, args_key(spec, (1,))) is MISSING, timeout=2)
    assert swr(1) == 1  # stale: served at once, refreshed in the background
    assert lcache.metrics.count("cache_gets", spec.name, "stale") >= 1  # type: ignore[attr-defined]
    wait_until(lambda: swr(1) == 2, timeout=5)


def test_local_per_function_and_off(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="test", ttl=60, local=True)
    try:

        @cache.cached(name="own", local=LocalTier(max_entries=3))
        def own(x: int) -> int:
            return x

        @cache.cached(name="off", local=False)
        def off(x: int) -> int:
            return x

        tier = _held_call(own, 0)
        for i in range(10):
            _held_call(own, i)
        assert len(tier.store) == 3 and tier.store is not tier_of(cache).store
        off(1)
        off(1)
        assert off._spec.local_tier() is None  # type: ignore[attr-defined]
        assert cache.metrics.count("cache_gets", "off", "local_hit") == 0  # type: ignore[attr-defined]
    finally:
        cache.close()


def test_other_arguments_are_keyed_by_the_redis_key(lcache: rcache.Cache) -> None:
    class Repo:
        @lcache.cached(ttl=60, name="repo.get", ignore=("self",))
        def get(self, item: tuple[int, int], *, scale: int = 1) -> int:
            return sum(item) * scale

    repo = Repo()
    tier = _held_call(repo.get, (1, 2), scale=2)
    assert repo.get((1, 2), scale=2) == 6
    key = ("r", Repo.get.key_for(repo, (1, 2), scale=2))
    assert held(tier, key) == 6
    assert Repo().get((1, 2), scale=2) == 6  # self ignored: the same Redis key


@pytest.mark.parametrize("guarded", [True, False], ids=["guard", "no-guard"])
def test_the_decorated_read_is_guarded_too(
    lcache: rcache.Cache,
    writer: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    guarded: bool,
) -> None:
    @lcache.cached(ttl=60, name="raced")
    def raced(x: int) -> str:
        return "computed"

    spec = raced._spec  # type: ignore[attr-defined]
    tier = spec.local_tier()
    assert tier.listener.guard.ready.wait(5)
    guard = tier.listener.guard
    if not guarded:
        monkeypatch.setattr(
            Invalidations, "admit", lambda self, t: t.ok and t.epoch == self.state[0]
        )
    store_now = LocalStore.store

    def delayed_store(
        self: LocalStore, token: Any, key: Any, value: Any, **kw: Any
    ) -> bool:
        received = guard.received
        writer.delete(raced.key_for(key[2]))  # another process invalidates it
        wait_until(lambda: guard.received > received, timeout=2, interval=0.0001)
        return store_now(self, token, key, value, **kw)

    stale = 0
    for i in range(40):
        raced(i)  # computed and stored in Redis
        monkeypatch.setattr(LocalStore, "store", delayed_store)
        raced(i)  # the read whose store the invalidation overtakes
        monkeypatch.setattr(LocalStore, "store", store_now)
        if held(tier, args_key(spec, (i,))) is not MISSING:
            stale += 1  # kept although Redis no longer has it
    print(f"decorated, guard={guarded}: {stale} stale rounds of 40")
    assert (stale == 0) if guarded else (stale > 0)


# -- Redis Cluster: a listener per primary ------------------------------------------------


def _one_key_per_primary(cache: rcache.Cache, cluster: RedisCluster) -> dict[int, str]:
    """primary port -> an explicit key of ``cache`` that this primary serves."""
    wanted = {n.port for n in cluster.primaries()}
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < len(wanted):
        port = cluster.node_for(rkey(cache, f"n{i}")).port
        keys.setdefault(port, f"n{i}")
        i += 1
    return keys


def _listeners(tier: Tier) -> ClusterListeners:
    assert isinstance(tier.listener, ClusterListeners)
    return tier.listener


def _write_elsewhere(cluster_url: str, items: dict[str, bytes]) -> None:
    """Write ``items`` from another process (a plain redis-py cluster client)."""
    seeds = cluster_url.split("://", 1)[1].split("/", 1)[0].split(",")
    host, port = seeds[0].rsplit(":", 1)
    code = (
        "import sys, json, redis.cluster as c\n"
        f"r = c.RedisCluster(host={host!r}, port={port})\n"
        "for k, v in json.loads(sys.stdin.read()).items():\n"
        "    r.set(k, v.encode('latin-1'))\n"
    )
    payload = json.dumps({k: v.decode("latin-1") for k, v in items.items()})
    subprocess.run(
        [sys.executable, "-c", code], input=payload, text=True, check=True, timeout=30
    )


def test_a_write_on_each_primary_invalidates(
    cluster_url: str, redis_cluster: RedisCluster
) -> None:
    cache = rcache.Cache(cluster_url, prefix="test", ttl=60, local=True)
    try:
        tier = tier_of(cache)
        cluster = _listeners(tier)
        primaries = {f"127.0.0.1:{n.port}" for n in redis_cluster.primaries()}
        assert set(cluster.listeners) == primaries  # one listener per primary
        for node in redis_cluster.primaries():
            client = node.client()
            names = [c["name"] for c in client.client_list()]
            client.close()
            assert names.count("rcache-invalidations") == 1, node.port
        keys = _one_key_per_primary(cache, redis_cluster)
        for port, key in keys.items():
            cache.set(key, port)
            warm(cache, key, port)
            listener = cluster.listener_of(rkey(cache, key))
            assert listener is not None and listener.node == f"127.0.0.1:{port}"
        assert len(tier.store) == len(keys)
        # (counted per guard: a previous test's FLUSHALL may be in it already)
        flushes = dict(tier.listener.guard.flushes)
        _write_elsewhere(
            cluster_url, {rkey(cache, k): envelope(-p) for p, k in keys.items()}
        )
        for key in keys.values():
            dropped_within(tier, key, 1)
        for port, key in keys.items():
            assert cache.get(key) == -port
        assert tier.listener.guard.flushes == flushes  # invalidated, not flushed
    finally:
        cache.close()


def test_a_killed_node_listener_flushes_and_recovers(
    cluster_url: str, redis_cluster: RedisCluster
) -> None:
    cache = rcache.Cache(cluster_url, prefix="test", ttl=60, local=True)
    try:
        tier = tier_of(cache)
        cluster = _listeners(tier)
        keys = _one_key_per_primary(cache, redis_cluster)
        for key in keys.values():
            cache.set(key, "old")
            warm(cache, key, "old")
        port, key = next(iter(keys.items()))
        victim = cluster.listener_of(rkey(cache, key))
        assert victim is not None
        first_id = victim.client_id
        node = next(n for n in redis_cluster.primaries() if n.port == port)
        client = node.client()
        try:
            # only this node's listener dies; a write lands before it is back
            client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            client.set(rkey(cache, key), envelope("during the gap"))
        finally:
            client.close()
        wait_until(lambda: victim.losses >= 1, timeout=2)
        assert len(tier.store) == 0  # the whole tier: every node's entries
        assert cache.get(key) == "during the gap"
        wait_until(tier.listener.guard.ready.is_set, timeout=5)
        assert victim.client_id not in (None, first_id)
        assert all(
            other.losses == 0
            for other in cluster.listeners.values()
            if other is not victim
        )
        warm(cache, key, "during the gap")
        writer = redis_cluster.client()
        writer.set(rkey(cache, key), envelope("after"))  # invalidations work again
        writer.close()
        dropped_within(tier, key, 1)
        assert cache.get(key) == "after"
        assert cache.metrics.count("local_flushes", "test", "disconnect") >= 1  # type: ignore[attr-defined]
    finally:
        cache.close()


def test_moved_flushes_and_the_slot_map_is_read_again(cluster_url: str) -> None:
    """A read sent to a node that does not serve its slot (the map in use is wrong,
    as after a resharding not seen yet) meets MOVED: answered through the cluster
    client, not kept, the tier flushed and the map read again."""
    cache = rcache.Cache(cluster_url, prefix="test", ttl=60, local=True)
    try:
        cache.set("k", 1)
        cache.set("other", 2)
        tier = warm(cache, "k", 1)
        cluster = _listeners(tier)
        warm(cache, "other", 2)
        right = cluster._route(rkey(cache, "k").encode())
        wrong = next(n for n in cluster.listeners if n != right)
        cluster._slots = [wrong] * 16384  # every slot "served" by one other node
        assert cache.get("k", local=False) == 1
        tier.store.clear()
        assert cache.get("k") == 1  # MOVED: read through the cluster client
        assert tier.listener.guard.flushes.get("topology", 0) >= 1
        warm(cache, "k", 1)  # the map was read again: tracked reads resume
        assert cluster._route(rkey(cache, "k").encode()) == right
    finally:
        cache.close()


def _primary_of(replica: RedisServer) -> int:
    client = replica.client()
    try:
        return int(client.info("replication")["master_port"])
    finally:
        client.close()


def _follows(cache: rcache.Cache, cluster: RedisCluster, key: str, value: Any) -> None:
    """The tier's listeners are the cluster's primaries now, and a write from another
    client to ``key`` (wherever it lives now) drops it."""
    tier = tier_of(cache)
    listeners = _listeners(tier)
    primaries = {f"127.0.0.1:{n.port}" for n in cluster.primaries()}
    wait_until(lambda: set(listeners.listeners) == primaries, timeout=5)
    wait_until(listeners.guard.ready.is_set, timeout=5)
    serving = listeners.listener_of(rkey(cache, key))
    assert serving is not None
    assert serving.node == f"127.0.0.1:{cluster.node_for(rkey(cache, key)).port}"
    cache.set(key, value)
    warm(cache, key, value)
    writer = cluster.client()
    writer.set(rkey(cache, key), envelope("written"))  # on the new primary
    writer.close()
    dropped_within(tier, key, 1)
    assert cache.get(key) == "written"


def test_cluster_failovers_flush_and_invalidations_work_after() -> None:
    """A graceful CLUSTER FAILOVER (seen by the slot map check), then a SIGKILLed
    primary (its listener's EOF flushes at once; the promoted replica is followed)."""
    # its own cluster: the session's keeps its topology for the other tests
    with RedisCluster() as cluster:  # 3 primaries: a majority votes when one dies
        cache = rcache.Cache(cluster.url, prefix="test", ttl=60, local=True)
        try:
            tier = tier_of(cache)
            listeners = _listeners(tier)
            keys = _one_key_per_primary(cache, cluster)
            for key in keys.values():
                cache.set(key, "before")
                warm(cache, key, "before")
            port, key = next(iter(keys.items()))
            replica = next(n for n in cluster.replicas() if _primary_of(n) == port)
            cluster.failover(replica)
            # the slot map check (every second) sees the new primary: flushed
            wait_until(lambda: len(tier.store) == 0, timeout=5)
            wait_until(
                lambda: listeners.guard.flushes.get("topology", 0) >= 1, timeout=5
            )
            _follows(cache, cluster, key, "after")
            assert cluster.node_for(rkey(cache, key)).port == replica.port

            # the other primary (it has a replica still) dies
            other = next(k for p, k in keys.items() if p != port)
            warm(cache, other, "before")
            disconnects = listeners.guard.flushes.get("disconnect", 0)
            victim = cluster.kill_primary(cluster.node_for(rkey(cache, other)))
            wait_until(lambda: len(tier.store) == 0, timeout=2)  # at once: its EOF
            assert listeners.guard.flushes.get("disconnect", 0) > disconnects
            cluster.wait_promoted(victim)
            _follows(cache, cluster, other, "after")
        finally:
            cache.close()
