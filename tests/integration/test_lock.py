"""Locks against a real redis-server: semantics, retries, renewal, faults, both modes."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

import rcache
from rcache import _lock
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    LockError,
    LockLostError,
    LockNotAcquiredError,
    LockNotOwnedError,
)
from rcache._metrics import InMemoryMetrics
from rcache.testing import RedisCluster, RedisServer, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.topologies("single", "cluster")]


def _metrics(cache: rcache.Cache) -> InMemoryMetrics:
    assert isinstance(cache.metrics, InMemoryMetrics)
    return cache.metrics


class FlakyRedis(redis.Redis):
    """Runs EVALSHA, then loses the reply ``lose`` times (a reset after the write).

    Hooked where every reply is read (``parse_response``), so it catches the scripts
    that rcache sends through its own bounded calls as well as ``evalsha()``.
    """

    lose = 0

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        result = super().parse_response(connection, command_name, **options)
        if command_name == "EVALSHA" and self.lose > 0:
            self.lose -= 1
            raise redis.ConnectionError("connection reset (reply lost)")
        return result


def _server_us(client: redis.Redis) -> int:
    """The server clock in microseconds (what a missing fence counter is seeded from)."""
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def _apoll(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """wait_until for coroutines: poll without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Losses:
    """How many replies the FlakyRedis clients of one test still lose."""

    lose = 0


class FlakyNode(FlakyRedis):
    """A cluster node's FlakyRedis: lock scripts run on the node serving their slot
    (rcache routes below the cluster client), all counting one ``Losses``."""

    losses = Losses()

    @property  # type: ignore[override]
    def lose(self) -> int:
        return self.losses.lose

    @lose.setter
    def lose(self, value: int) -> None:
        self.losses.lose = value


def _flaky(cache: rcache.Cache, url: str) -> FlakyRedis | Losses:
    cache._sync.client  # noqa: B018 -- bind the driver to this process first
    if not url.startswith("redis+cluster://"):
        flaky = FlakyRedis.from_url(url)
        cache._sync._client = flaky
        return flaky
    client: Any = rcache.Cache(url)._sync.client  # a cluster client as rcache makes it
    losses = FlakyNode.losses = Losses()
    for node in client.get_nodes():
        node.redis_connection = FlakyNode(
            connection_pool=node.redis_connection.connection_pool
        )
    cache._sync._client = client
    return losses


def _on_node(client: redis.Redis, key: str) -> redis.Redis:
    """A client of the server holding ``key``: ``client`` itself, or on a cluster its
    node serving the key's slot (a lock's keys, its waiters' BLPOP, are all there)."""
    if isinstance(client, redis.cluster.RedisCluster):
        return client.get_node_from_key(key).redis_connection  # type: ignore[no-any-return]
    return client


def _blocked(client: redis.Redis, key: str) -> bool:
    """Is a client blocked in BLPOP on the server holding ``key``?"""
    return b"blpop" in _on_node(client, key).execute_command("CLIENT", "LIST")


def _sync_client(
    request: pytest.FixtureRequest, topology: str, **options: Any
) -> redis.Redis:
    """A sync client of what redis_url serves, made directly (not by rcache)."""
    if topology == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.client(**options)  # type: ignore[return-value]
    server: RedisServer = request.getfixturevalue("redis_server")
    return redis.Redis(host="127.0.0.1", port=server.port, **options)


def _async_client_factory(
    request: pytest.FixtureRequest, topology: str, **options: Any
) -> Callable[[], redis.asyncio.Redis]:
    """Async clients of what redis_url serves, made directly (not by rcache)."""
    if topology == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        seeds = [
            redis.asyncio.cluster.ClusterNode("127.0.0.1", n.port)
            for n in cluster.nodes
            if n.running
        ]
        return lambda: redis.asyncio.cluster.RedisCluster(  # type: ignore[return-value]
            startup_nodes=seeds, **options
        )
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: redis.asyncio.Redis(host="127.0.0.1", port=server.port, **options)


# -- basics -----------------------------------------------------------------------------


def test_keys_hash_tagged_ttl_always_set_and_fence_increasing(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    before = _server_us(redis_client)
    with cache.lock("report:2024-11") as lock:
        first = lock.fence  # a new counter starts at the server clock in µs
        assert before < first <= _server_us(redis_client) + 1
        pttl = redis_client.pttl("test:l:{report:2024-11}")
        assert 29_000 < pttl <= 30_000  # default 30 s lease, never without TTL
        lock.ensure_held()
        assert lock.held
    assert redis_client.exists("test:l:{report:2024-11}") == 0
    assert redis_client.get("test:l:{report:2024-11}:fence") == str(first).encode()
    # nobody waited: no waiters marker, and the release pushed no wake-up signal
    assert _on_node(redis_client, "{report:2024-11}").keys(
        "test:l:{report:2024-11}:*"
    ) == [b"test:l:{report:2024-11}:fence"]
    fences = []
    for _ in range(3):
        with cache.lock("report:2024-11") as lock:
            fences.append(lock.fence)
    assert fences == [first + 1, first + 2, first + 3]


def test_busy_and_timeout(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    holder = cache.lock("busy", ttl=10)
    assert holder.acquire(timeout=0)
    other = cache.lock("busy", ttl=10, timeout=0.2)
    assert other.acquire(timeout=0) is False
    assert redis_client.exists("test:l:{busy}:w") == 0  # a single try is no waiter
    start = time.monotonic()
    assert other.acquire() is False  # the lock's default timeout, 0.2 s
    assert 0.2 <= time.monotonic() - start < 1.0
    with pytest.raises(LockNotAcquiredError) as info, other:
        pass
    assert isinstance(info.value, TimeoutError)
    holder.release()
    m = _metrics(cache)
    assert m.count("lock_acquires", "busy", "busy") == 1
    assert m.count("lock_acquires", "busy", "timeout") == 2
    assert m.count("locks_held", "busy") == 0


def test_identity_is_per_thread_not_per_object(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    shared = cache.lock("shared", ttl=10)
    assert shared.acquire()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            shared.release()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1
    assert isinstance(errors[0], LockNotOwnedError)
    assert (
        redis_client.exists("test:l:{shared}") == 1
    )  # not deleted by the other thread
    with pytest.raises(LockError, match="not reentrant"):
        shared.acquire(timeout=0)
    shared.release()
    assert redis_client.exists("test:l:{shared}") == 0


async def test_tasks_sharing_one_lock_object(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    shared = cache.lock("tasks", ttl=10, timeout=5)
    order: list[str] = []
    a_holds = asyncio.Event()
    a_go = asyncio.Event()

    async def a() -> None:
        async with shared:
            order.append("a-in")
            a_holds.set()
            await a_go.wait()
            order.append("a-out")

    async def b() -> None:
        await a_holds.wait()
        with pytest.raises(LockNotOwnedError):
            await shared.arelease()  # b cannot release a's hold
        assert redis_client.exists("test:l:{tasks}") == 1
        a_go.set()
        async with shared:
            order.append("b-in")

    await asyncio.gather(a(), b())
    assert order == ["a-in", "a-out", "b-in"]


def test_forked_child_cannot_release_parents_lock(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    lock = cache.lock("forked", ttl=10)
    assert lock.acquire()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            lock.release()
            queue.put("released")
        except LockNotOwnedError:
            queue.put("LockNotOwnedError")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        p = ctx.Process(target=child)
        p.start()
    assert queue.get(timeout=20) == "LockNotOwnedError"
    p.join(10)
    assert redis_client.exists("test:l:{forked}") == 1
    lock.release()


def test_extend_replaces_ttl(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    lock = cache.lock("ext", ttl=10)
    assert lock.acquire()
    lock.extend(2)
    lock.extend(2)  # a retried extend must not add up
    assert 1000 < redis_client.pttl("test:l:{ext}") <= 2000
    lock.extend()
    assert redis_client.pttl("test:l:{ext}") > 9000
    lock.release()
    with pytest.raises(LockNotOwnedError):
        lock.extend()


def test_expired_lease_release_does_not_delete_new_holder(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    lost: list[_lock.Lease] = []
    old = cache.lock("exp", ttl=0.2, on_lost=lost.append)
    assert old.acquire()  # explicit acquire: no auto-renewal by default
    wait_until(lambda: redis_client.exists("test:l:{exp}") == 0, 5, message="expiry")
    new = cache.lock("exp", ttl=10)
    assert new.acquire(timeout=0)
    with pytest.raises(LockLostError):
        old.ensure_held()
    wait_until(lambda: lost, 5, message="on_lost")
    with pytest.raises(LockNotOwnedError):
        old.release()
    assert redis_client.get("test:l:{exp}") == new.lease.token.encode()  # type: ignore[union-attr]
    quiet = cache.lock("exp", ttl=0.1, raise_on_not_owned=False)
    new.release()
    assert quiet.acquire(timeout=0)
    redis_client.delete("test:l:{exp}")
    quiet.release()  # no raise with the opt-out flag
    quiet.release()  # nothing held, no raise either
    assert _metrics(cache).count("lock_releases", "exp", "not_owned") == 3


# -- retries and lost replies (the retry hazard of redis-py 8.1 in locks.md) -------------


def test_retried_acquire_that_finds_its_own_token_is_acquired(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="test")
    flaky = _flaky(cache, redis_url)
    flaky.lose = 1
    lock = cache.lock("lost-reply", ttl=10)
    assert lock.acquire(timeout=0)  # would block on its own key without idempotency
    assert flaky.lose == 0  # the reply was lost indeed
    # INCR ran once: the counter holds the fence the holder got
    assert redis_client.get("test:l:{lost-reply}:fence") == str(lock.fence).encode()
    flaky.lose = 1
    lock.release()  # the retry finds the key gone: no spurious LockNotOwnedError
    assert redis_client.exists("test:l:{lost-reply}") == 0
    assert _metrics(cache).count("lock_releases", "lost-reply", "released") == 1
    cache.close()


# -- renewal, lost leases, max_hold -------------------------------------------------------


def test_auto_renewal_and_on_lost_when_the_key_disappears(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    lost: list[_lock.Lease] = []
    lock = cache.lock("renew", ttl=0.3, on_lost=lost.append)
    with lock:
        wait_until(
            lambda: _metrics(cache).count("lock_renewals", "renew", "renewed") >= 4,
            5,
            message="renewals",
        )
        assert redis_client.exists("test:l:{renew}") == 1  # alive after > 3 leases
        lock.ensure_held()
        redis_client.delete("test:l:{renew}")  # e.g. an operator, or a failover
        wait_until(lambda: lost, 5, message="on_lost")
        assert lost[0].name == "renew"
        with pytest.raises(LockLostError):
            lock.ensure_held()
        # leaving the block releases: it raises LockNotOwnedError, deleting nothing
        lock.raise_on_not_owned = False
    assert _metrics(cache).count("lock_renewals", "renew", "lost") == 1


async def test_async_leases_are_renewed_on_their_own_loop(
    request: pytest.FixtureRequest, topology: str, redis_client: redis.Redis
) -> None:
    # The sync client points at a closed port: renewals must use the loop's client.
    cache = rcache.Cache(
        "redis://127.0.0.1:1/0",
        async_client=_async_client_factory(request, topology),
        prefix="test",
    )
    lost: list[_lock.Lease] = []
    async with cache.lock("ar", ttl=0.3, on_lost=lost.append) as lock:
        await _apoll(
            lambda: _metrics(cache).count("lock_renewals", "ar", "renewed") >= 4
        )
        assert redis_client.exists("test:l:{ar}") == 1
        await lock.aensure_held()
    assert not lost
    assert redis_client.exists("test:l:{ar}") == 0
    await cache.aclose()


async def test_blocked_event_loop_loses_its_lease(cache: rcache.Cache) -> None:
    lost: list[_lock.Lease] = []
    lock = cache.lock("blocked", ttl=0.3, on_lost=lost.append, raise_on_not_owned=False)
    async with lock:
        time.sleep(0.6)  # noqa: ASYNC251 -- a blocked loop cannot renew its lease
        assert lost
        with pytest.raises(LockLostError):
            await lock.aensure_held()


def test_one_renewer_thread_per_process(cache: rcache.Cache) -> None:
    locks = [cache.lock(f"many:{i}", ttl=5) for i in range(20)]
    for lock in locks:
        lock.__enter__()
    renewers = [t for t in threading.enumerate() if t.name == "rcache-lock-renewer"]
    assert len(renewers) == 1
    for lock in locks:
        lock.__exit__(None, None, None)


class CountingRedis(redis.Redis):
    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        type(self).pipelines += 1
        return super().pipeline(*args, **kwargs)


class CountingCluster(redis.cluster.RedisCluster):
    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        type(self).pipelines += 1
        return super().pipeline(*args, **kwargs)


def test_renewals_are_batched_and_survive_script_flush(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="test")
    cache._sync.client  # noqa: B018 -- bind the driver to this process first
    counting: type[CountingRedis | CountingCluster] = CountingRedis
    if redis_url.startswith("redis+cluster://"):
        counting = CountingCluster
        cache._sync._client = CountingCluster(  # type: ignore[assignment]
            startup_nodes=[
                redis.cluster.ClusterNode(*host.split(":"))  # type: ignore[no-untyped-call]
                for host in redis_url.removeprefix("redis+cluster://").split(",")
            ]
        )
    else:
        cache._sync._client = CountingRedis.from_url(redis_url)
    lost: list[_lock.Lease] = []
    locks = [cache.lock(f"batch:{i}", ttl=0.4, on_lost=lost.append) for i in range(12)]
    for lock in locks:
        lock.__enter__()
    redis_client.script_flush()  # the batch answers NOSCRIPT: single calls reload

    def renewals() -> int:
        m = _metrics(cache)
        return sum(m.count("lock_renewals", f"batch:{i}", "renewed") for i in range(12))

    wait_until(lambda: renewals() >= 12 * 4, 5, message="renewals")
    assert not lost
    assert all(redis_client.exists(f"test:l:{{batch:{i}}}") for i in range(12))
    # one pipeline renews many leases: far fewer pipelines than renewals
    assert 0 < counting.pipelines <= renewals() / 3
    for lock in locks:
        lock.__exit__(None, None, None)
    cache.close()


def test_max_hold_stops_renewal(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    lost: list[_lock.Lease] = []
    lock = cache.lock(
        "cap", ttl=0.3, max_hold=0.4, auto_renew=True, on_lost=lost.append
    )
    assert lock.acquire()
    start = time.monotonic()
    wait_until(lambda: lost, 5, message="on_lost after max_hold")
    assert 0.4 < time.monotonic() - start < 2.0
    wait_until(lambda: redis_client.exists("test:l:{cap}") == 0, 5, message="expiry")
    with pytest.raises(LockNotOwnedError):
        lock.release()


def test_waiter_is_woken_by_release_not_by_polling(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.lock("wake", ttl=30)
    assert holder.acquire()
    got: list[float] = []

    def waiter() -> None:
        lock = cache.lock("wake", ttl=30, timeout=10)
        assert lock.acquire()
        got.append(time.monotonic())
        lock.release()

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(
        lambda: _blocked(redis_client, "{wake}"),
        5,
        message="waiter blocked in BLPOP",
    )
    released = time.monotonic()
    holder.release()
    t.join(10)
    assert got
    assert got[0] - released < 0.25  # not the holder's 30 s PTTL, not a poll interval


def test_releaser_does_not_overtake_the_woken_waiter(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    order: list[str] = []
    holder = cache.lock("grace", ttl=10)
    assert holder.acquire()

    def waiter() -> None:
        lock = cache.lock("grace", ttl=10, timeout=10)
        with lock:
            order.append("waiter")

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(
        lambda: _blocked(redis_client, "{grace}"),
        5,
        message="waiter blocked in BLPOP",
    )
    holder.release()
    assert holder.acquire(timeout=5)  # at once: without the grace it would barge
    order.append("releaser")
    holder.release()
    t.join(10)
    assert order == ["waiter", "releaser"]


def test_idle_waiter_sends_almost_nothing(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.lock("idle", ttl=30)
    assert holder.acquire()

    def calls(cmd: str) -> int:
        info = _on_node(redis_client, "{idle}").info("commandstats")
        stats = info.get(f"cmdstat_{cmd}", {})
        return int(stats.get("calls", 0))

    tries, blocks = calls("evalsha"), calls("blpop")
    start = time.monotonic()
    assert cache.lock("idle", ttl=30).acquire(timeout=1.5) is False
    assert time.monotonic() - start >= 1.5
    # A 100 ms poll would be 15 tries; here: first try, one or two blocking waits
    # (capped under the socket timeout), and the last try at the deadline.
    assert calls("evalsha") - tries <= 3
    assert calls("blpop") - blocks <= 2
    holder.release()


# -- Redis faults: fail closed -----------------------------------------------------------


def test_redis_down_fails_closed(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test")
    lost: list[_lock.Lease] = []
    lock = cache.lock("down", ttl=0.5, on_lost=lost.append)
    lock.__enter__()
    server.kill()
    with pytest.raises(LockNotAcquiredError) as info:
        cache.lock("other").acquire(timeout=1)
    assert isinstance(info.value.__cause__, BackendUnavailableError)
    wait_until(lambda: lost, 5, message="on_lost while Redis is down")
    with pytest.raises(LockLostError):
        lock.ensure_held()
    with pytest.raises(LockError):  # the release cannot be confirmed: fail closed
        lock.__exit__(None, None, None)
    assert _metrics(cache).count("lock_acquires", "other", "error") == 1
    cache.close()


async def test_redis_down_fails_closed_async(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test")
    lock = cache.lock("down", ttl=1)
    assert await lock.aacquire()
    old_fence = lock.fence
    server.kill()
    with pytest.raises(LockNotAcquiredError):
        await cache.lock("other").aacquire(timeout=1)
    with pytest.raises(LockError):
        await lock.arelease()
    assert lock.lease is not None  # kept: the release can be retried
    server.start()  # back, empty, same port
    await _apoll(lambda: not lock.held)  # the unconfirmed lease has run out locally
    assert await lock.aacquire(timeout=2)  # and does not block this task forever
    assert lock.fence > old_fence  # the counter was lost with the data: re-seeded above
    await lock.arelease()
    await cache.aclose()
    cache.close()


def test_redis_restarted_mid_hold(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="test")
    lost: list[_lock.Lease] = []
    lock = cache.lock("restart", ttl=1, on_lost=lost.append)
    with lock:
        server.restart()  # same port, empty dataset: the lock is gone
        wait_until(lambda: lost, 5, message="on_lost after restart")
        with pytest.raises(LockLostError):
            lock.ensure_held()
        other = cache.lock("restart", ttl=5)
        assert other.acquire(timeout=2)  # the scripts are reloaded after NOSCRIPT
        other.release()
        lock.raise_on_not_owned = False  # the release finds nothing and says so quietly
    assert _metrics(cache).count("lock_releases", "restart", "not_owned") == 1
    cache.close()


# -- both decode_responses modes -------------------------------------------------------


@pytest.mark.parametrize("decode", [False, True])
async def test_decode_responses_modes(
    request: pytest.FixtureRequest, topology: str, redis_url: str, decode: bool
) -> None:
    client = _sync_client(request, topology, decode_responses=decode)
    factory = _async_client_factory(request, topology, decode_responses=decode)

    # client= is used for sync calls (rcache makes a bytes twin of a decoding client);
    # the async side is given the same kind of client through async_client=.
    cache = rcache.Cache(client=client, async_client=factory, prefix="dec")
    if topology == "cluster" and decode:
        # rcache makes no bytes twin of a decoding RedisCluster: it says so at once
        with pytest.raises(ConfigurationError, match="decode_responses=False"):
            cache.lock("m").acquire(timeout=0)
        cache.close()
        client.close()
        return
    before = int(client.time()[0]) * 1_000_000
    with cache.lock("m", ttl=5) as lock:
        first = lock.fence
        assert first > before
        assert lock.lease is not None
        assert client.get("dec:l:{m}") == (
            lock.lease.token if decode else lock.lease.token.encode()
        )
        assert cache.lock("m").acquire(timeout=0) is False
    async with cache.lock("m", ttl=5) as alock:
        assert alock.fence == first + 1
        assert await cache.lock("m").aacquire(timeout=0.05) is False
    with cache.rwlock("rw").read() as r1:
        assert r1.held
    async with cache.rwlock("rw").write() as w:
        assert w.fence > before
    async with cache.semaphore("s", limit=1) as s:
        assert s.fence > before
        sem_first = s.fence
    with cache.semaphore("s", limit=1) as s:
        assert s.fence == sem_first + 1
    assert client.exists("dec:l:{m}") == 0
    await cache.aclose()
    cache.close()
    client.close()


async def test_decoding_sync_client_only_also_serves_async_locks(
    request: pytest.FixtureRequest, topology: str, redis_url: str
) -> None:
    client = _sync_client(request, topology, decode_responses=True)
    cache = rcache.Cache(client=client, prefix="dec")
    try:
        async with cache.lock("only-client", ttl=5) as lock:
            assert lock.fence > 1_000_000_000_000_000  # seeded from the server clock
    finally:
        await cache.aclose()
        client.close()


# -- @locked ---------------------------------------------------------------------------


def test_locked_sync_serializes_and_keeps_signature(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    inside = 0
    peak = 0
    seen: list[bytes | None] = []

    @cache.locked("invoice:{invoice_id}", ttl=10, timeout=10)
    def pay(invoice_id: int, amount: int = 1) -> int:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        seen.append(redis_client.get(f"test:l:{{invoice:{invoice_id}}}"))
        time.sleep(0.005)
        inside -= 1
        return amount

    assert pay.__name__ == "pay"
    assert list(inspect.signature(pay).parameters) == ["invoice_id", "amount"]
    threads = [threading.Thread(target=pay, args=(7,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 1
    assert all(v is not None for v in seen)  # the lock was held during each call
    assert pay(8, amount=3) == 3
    assert (
        _metrics(cache).count("lock_acquires", "invoice:{invoice_id}", "acquired") == 5
    )


async def test_locked_async_and_methods(cache: rcache.Cache) -> None:
    class Billing:
        @cache.locked("bill:{self.account}:{n}", ttl=10, timeout=10)
        async def charge(self, n: int) -> str:
            await asyncio.sleep(0.01)
            return f"{self.account}:{n}"

        def __init__(self, account: str) -> None:
            self.account = account

    assert inspect.iscoroutinefunction(Billing.charge)
    b = Billing("acme")
    results = await asyncio.gather(*(b.charge(1) for _ in range(3)))
    assert results == ["acme:1"] * 3
    assert (
        _metrics(cache).count("lock_acquires", "bill:{self.account}:{n}", "acquired")
        == 3
    )

    holder = cache.lock("bill:acme:2", ttl=10)
    assert holder.acquire()

    @cache.locked("bill:{account}:{n}", ttl=10, timeout=0)
    async def busy(account: str, n: int) -> None: ...

    with pytest.raises(LockNotAcquiredError):
        await busy("acme", 2)
    holder.release()


def test_locked_configuration_errors(cache: rcache.Cache) -> None:
    def f(a: int) -> None: ...

    with pytest.raises(ConfigurationError, match="does not take"):
        cache.locked("x:{b}")(f)
    with pytest.raises(ConfigurationError):
        cache.locked("x:{a}", ttl=0)
    with pytest.raises(ConfigurationError):
        cache.locked("x", ttl=-1)
    with pytest.raises(ConfigurationError):
        cache.locked("x", timeout=-1)
    with pytest.raises(ConfigurationError):
        cache.locked("x")(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError):
        cache.locked("")
    with pytest.raises(ConfigurationError):
        cache.lock("x", ttl=0)
    with pytest.raises(ConfigurationError):
        cache.lock("x", on_lost="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        cache.semaphore("x", limit=0)
    with pytest.raises(ConfigurationError):
        cache.rwlock("x", max_hold=0)


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt (which pytest itself would act on)."""


def test_sync_interrupt_after_grant_leaves_no_lock(
    cache: rcache.Cache, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = cache.lock("ki", ttl=30)
    real = lock._acquire_call

    class GrantedThenInterrupted:
        def __init__(self, call: Any) -> None:
            self.call = call

        def run(self, client: Any, *within: Any) -> Any:
            self.call.run(client, *within)  # the server granted the lock ...
            raise Interrupt  # ... and the caller is interrupted before the reply

    monkeypatch.setattr(
        lock, "_acquire_call", lambda *a: GrantedThenInterrupted(real(*a))
    )
    with pytest.raises(Interrupt):
        lock.acquire()
    assert redis_client.exists("test:l:{ki}") == 0  # released by token at once
    assert lock.lease is None


# -- asyncio cancellation at each await ------------------------------------------------


async def test_cancel_while_waiting_leaves_nothing(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.lock("cw", ttl=10)
    assert await holder.aacquire()
    waiter = cache.lock("cw", ttl=10)
    task = asyncio.ensure_future(waiter.aacquire(timeout=None))
    await _apoll(lambda: _blocked(redis_client, "{cw}"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await holder.arelease()
    assert waiter.lease is None
    assert redis_client.exists("test:l:{cw}") == 0
    assert await waiter.aacquire(timeout=0)  # and the object is still usable
    await waiter.arelease()


async def test_cancelled_waiter_passes_the_wake_up_on(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.semaphore("cwake", limit=1, ttl=10)
    assert await holder.aacquire()
    task = asyncio.ensure_future(
        cache.semaphore("cwake", limit=1).aacquire(timeout=None)
    )
    await _apoll(lambda: _blocked(redis_client, "{cwake}"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # it may have popped a signal just before: one is pushed back for the next waiter
    await _apoll(lambda: redis_client.llen("test:l:{cwake}:sem:signal") == 1)
    await holder.arelease()


async def test_cancel_during_acquire_script_compensates(
    cache: rcache.Cache, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = cache.lock("cs", ttl=30)
    real = lock._acquire_call
    granted = asyncio.Event()

    class SlowReply:
        def __init__(self, call: Any) -> None:
            self.call = call

        async def arun(self, client: Any, *within: Any) -> Any:
            result = await self.call.arun(client, *within)  # the server granted it ...
            granted.set()
            await asyncio.sleep(10)  # ... and the reply is slow to come back
            return result

    monkeypatch.setattr(lock, "_acquire_call", lambda *a: SlowReply(real(*a)))
    task = asyncio.ensure_future(lock.aacquire())
    await granted.wait()
    assert redis_client.exists("test:l:{cs}") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The compensating release runs in the background: no orphan lock until its TTL.
    await _apoll(lambda: redis_client.exists("test:l:{cs}") == 0)
    assert lock.lease is None


async def test_cancel_during_release_still_releases(
    cache: rcache.Cache, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = cache.lock("cr", ttl=30)
    real = lock._release_call
    started = asyncio.Event()

    class SlowSend:
        def __init__(self, call: Any) -> None:
            self.call = call

        async def arun(self, client: Any, *within: Any) -> Any:
            started.set()
            await asyncio.sleep(0.1)
            return await self.call.arun(client, *within)

    monkeypatch.setattr(lock, "_release_call", lambda t: SlowSend(real(t)))

    async def holder() -> None:
        assert await lock.aacquire()
        await lock.arelease()

    task = asyncio.ensure_future(holder())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert redis_client.exists("test:l:{cr}") == 1  # not yet confirmed ...
    assert lock._holds  # ... so the token is kept (redis-py #3847)
    await _apoll(lambda: redis_client.exists("test:l:{cr}") == 0)
    await _apoll(lambda: not lock._holds)


async def test_cancel_during_extend_keeps_the_lease(
    cache: rcache.Cache, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = cache.lock("ce", ttl=5)
    real = lock._extend_call
    started = asyncio.Event()

    class SlowSend:
        def __init__(self, call: Any) -> None:
            self.call = call

        async def arun(self, client: Any, *within: Any) -> Any:
            started.set()
            await asyncio.sleep(10)
            return await self.call.arun(client, *within)

    monkeypatch.setattr(lock, "_extend_call", lambda t, ttl: SlowSend(real(t, ttl)))

    async def holder() -> None:
        assert await lock.aacquire()
        await lock.aextend(60)

    task = asyncio.ensure_future(holder())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lease = next(iter(lock._holds.values()))
    assert lease.held  # unchanged: the old deadline still applies
    assert 0 < redis_client.pttl("test:l:{ce}") <= 5000  # not extended
    assert lock.lease is None  # the hold belongs to the cancelled task, so clean up
    lease.released = True  # by hand: the renewer drops it
    lock._holds.clear()
    redis_client.delete("test:l:{ce}")


async def test_cancelled_body_releases(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    entered = asyncio.Event()

    async def body() -> None:
        async with cache.lock("cb", ttl=30):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert redis_client.exists("test:l:{cb}") == 0


async def test_cancelled_waiting_writer_withdraws_its_intent(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    rw = cache.rwlock("cwi", ttl=10)
    reader = rw.read()
    assert await reader.aacquire()
    task = asyncio.ensure_future(rw.write().aacquire(timeout=None))
    await _apoll(lambda: redis_client.zcard("test:l:{cwi}:rw:wq") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _apoll(lambda: redis_client.zcard("test:l:{cwi}:rw:wq") == 0)  # readers pass
    other = cache.rwlock("cwi").read()
    assert await other.aacquire(timeout=0)
    await other.arelease()
    await reader.arelease()


async def test_a_cancelled_waiting_acquire_never_goes_on_to_take_the_lock(
    cache: rcache.Cache,
) -> None:
    """Cancel a waiting acquire after 0, 1, 2, ... loop turns, so that one of the
    cancellations lands in the turn where redis-py's send completes: there, before
    Python 3.12, asyncio.wait_for returned normally (CPython gh-86296) and the waiter
    went on to BLPOP, taking the lock when the holder's lease ran out."""
    holder = cache.lock("cancel-sweep", ttl=10)
    assert await holder.aacquire()
    for turns in range(60):
        task = asyncio.ensure_future(cache.lock("cancel-sweep").aacquire(timeout=None))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        # a swallowed cancellation leaves the task blocked in BLPOP: not done in time
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done, f"cancelled after {turns} loop turns, the acquire kept waiting"
        assert task.cancelled(), f"after {turns} turns: {task.result()!r}"
    await holder.arelease()


# -- fair mode ------------------------------------------------------------------------


def test_fair_lock_grants_in_arrival_order_without_barging(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.lock("fifo", ttl=10, fair=True)
    assert isinstance(holder, _lock.FairLock)
    assert holder.acquire()
    first = holder.fence
    order: list[int] = []
    fences: list[int] = []

    def waiter(i: int) -> None:
        lock = cache.lock("fifo", ttl=10, timeout=10, fair=True)
        with lock:
            order.append(i)
            fences.append(lock.fence)
            time.sleep(0.01)

    threads = []
    for i in range(4):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda i=i: redis_client.zcard("test:l:{fifo}:fq") == i + 1, 5)
    holder.release()
    assert (
        holder.acquire(timeout=0) is False
    )  # the releaser cannot barge past the queue
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3]
    assert fences == [first + 1, first + 2, first + 3, first + 4]
    assert redis_client.zcard("test:l:{fifo}:fq") == 0


async def test_fair_lock_waiter_that_gives_up_leaves_the_queue(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    holder = cache.lock("fifo2", ttl=10, fair=True)
    assert await holder.aacquire()
    quitter = cache.lock("fifo2", ttl=10, fair=True)
    assert await quitter.aacquire(timeout=0.1) is False
    assert redis_client.zcard("test:l:{fifo2}:fq") == 0
    task = asyncio.ensure_future(cache.lock("fifo2", fair=True).aacquire(timeout=None))
    await _apoll(lambda: redis_client.zcard("test:l:{fifo2}:fq") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _apoll(lambda: redis_client.zcard("test:l:{fifo2}:fq") == 0)
    await holder.arelease()
    assert await quitter.aacquire(timeout=0)  # no dead waiter blocks the queue
    await quitter.arelease()


# -- RW lock and semaphore --------------------------------------------------------------


def test_rwlock_readers_share_writer_excludes_and_is_preferred(
    cache: rcache.Cache,
) -> None:
    rw = cache.rwlock("doc:1", ttl=10, timeout=5)
    r1 = rw.read()
    assert r1.acquire()
    r2 = cache.rwlock("doc:1").read()
    assert r2.acquire(timeout=0)  # readers share
    w = cache.rwlock("doc:1", ttl=10).write()
    assert w.acquire(timeout=0) is False  # records a writer intent
    got: list[float] = []

    def writer() -> None:
        lock = cache.rwlock("doc:1", ttl=10).write()
        assert lock.acquire(timeout=10)
        got.append(time.monotonic())
        lock.release()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    late_reader = cache.rwlock("doc:1").read()
    assert late_reader.acquire(timeout=0) is False  # a waiting writer keeps readers out
    r1.release()
    released = time.monotonic()
    r2.release()
    t.join(10)
    assert got
    assert got[0] - released < 0.5  # woken by the last reader's release
    assert late_reader.acquire(timeout=2)
    late_reader.release()


def test_rwlock_write_fences_and_dead_reader_freed(
    cache: rcache.Cache,
) -> None:
    fences = []
    for _ in range(2):
        with cache.rwlock("doc:2").write() as w:
            fences.append(w.fence)
    assert fences[0] > 1_000_000_000_000_000  # seeded from the server clock in µs
    assert fences[1] == fences[0] + 1
    stale = cache.rwlock("doc:2", ttl=0.3).read()
    assert stale.acquire()  # never released: like a crashed reader
    start = time.monotonic()
    with cache.rwlock("doc:2", timeout=5).write():
        assert time.monotonic() - start < 1.0
    with pytest.raises(LockNotOwnedError):
        stale.release()


async def test_semaphore_limit_and_reclaim(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    inside = peak = 0

    async def worker() -> None:
        nonlocal inside, peak
        async with cache.semaphore("q", limit=3, ttl=10, timeout=10):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(12)))
    assert peak == 3
    leaked = cache.semaphore("q", limit=1, ttl=0.2)
    assert await leaked.aacquire()  # never released
    again = cache.semaphore("q", limit=1, ttl=10)
    start = time.monotonic()
    assert await again.aacquire(timeout=5)
    assert time.monotonic() - start < 1.0  # the leaked permit came back after its lease
    await again.arelease()
    with pytest.raises(LockNotOwnedError):
        await leaked.arelease()
    assert redis_client.zcard("test:l:{q}:sem") == 0


@pytest.fixture
def memory_cache() -> Iterator[rcache.Cache]:
    pytest.importorskip("lupa")
    c = rcache.Cache("memory://", prefix="mem")
    yield c
    c.close()


def test_memory_backend_lock(memory_cache: rcache.Cache) -> None:
    with memory_cache.lock("m", ttl=5) as lock:
        assert lock.fence > 1_000_000_000_000_000  # seeded from the server clock (µs)
        first = lock.fence
        assert memory_cache.lock("m").acquire(timeout=0.05) is False
    with memory_cache.lock("m", ttl=5) as lock:
        assert lock.fence == first + 1
    with memory_cache.semaphore("s", limit=1):
        pass
