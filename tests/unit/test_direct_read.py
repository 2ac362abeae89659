"""The hit read below redis-py's command layer (``SyncRedis.mget``/``AsyncRedis.mget``).

It keeps ``run()``'s contract: errors mapped, transient ones retried on the same
schedule, a connection whose reply was lost dropped (never pooled with a reply
pending), one pooled connection back after every outcome, cancellation delivered; and
the breaker counts a failed hit as before. Clients it cannot read below (cluster,
sentinel, memory://, single connection, client-side cache) go through ``mget``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

import rcache
from rcache import _redis
from rcache.testing import FaultProxy, RedisServer

pytestmark = pytest.mark.timeout(60)

FAST_BREAKER = rcache.BreakerPolicy(failures=2, reset_after=30.0, max_reset_after=30.0)


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def _cache(proxy: FaultProxy, **kw: Any) -> rcache.Cache:
    # a short socket timeout: a lost reply costs 0.3 s, not 1 s
    return rcache.Cache(proxy.url + "?socket_timeout=0.3", prefix="dr", **kw)


def _direct(on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the hit read through redis-py's ``mget`` (``on`` False): the reference."""
    if not on:
        monkeypatch.setattr(_redis, "_direct_sync", lambda client: False)
        monkeypatch.setattr(_redis, "_direct_async", lambda client: (False, False))


# -- which clients read directly -----------------------------------------------------------


def test_only_plain_clients_read_below_the_command_layer(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)
    assert _redis._direct_sync(plain)
    single = redis.Redis.from_url(redis_url, single_connection_client=True)
    blocking = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(redis_url)
    )
    callback = redis.Redis.from_url(redis_url)
    callback.set_response_callback("MGET", lambda r, **kw: r)
    for client in (single, blocking, callback):
        assert not _redis._direct_sync(client)
        client.close()
    plain.close()
    memory = rcache.Cache("memory://")
    assert not _redis._direct_sync(memory._sync.client)


def test_async_plain_clients_pack_with_hiredis_when_utf8(redis_url: str) -> None:
    hiredis = _redis._HIREDIS_PACKER is not None
    assert _redis._direct_async(redis.asyncio.Redis.from_url(redis_url)) == (
        True,
        hiredis,
    )
    latin = redis.asyncio.Redis.from_url(redis_url, encoding="latin-1")
    assert _redis._direct_async(latin) == (True, False)
    single = redis.asyncio.Redis.from_url(redis_url, single_connection_client=True)
    assert _redis._direct_async(single) == (False, False)


def test_hiredis_writes_the_bytes_redis_asyncio_writes() -> None:
    pack = pytest.importorskip("hiredis").pack_command
    conn = redis.asyncio.Connection()
    for keys in (["a"], ["p:f:n:[42]", "p:s:f:n", "é✓ ключ"], ["k" * 10_000, "x"]):
        assert pack(("MGET", *keys)) == b"".join(conn.pack_command("MGET", *keys))


@pytest.mark.parametrize("direct", [True, False])
async def test_reads_what_mget_reads(
    direct: bool,
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    keys = ["dr:a", "dr:é✓", "dr:missing", "dr:" + "k" * 10_000]
    for key in keys:
        if key != "dr:missing":
            redis_client.set(key, key.encode() * 3)
    want = redis_client.mget(keys)
    cache = rcache.Cache(redis_url, prefix="dr")
    assert cache._sync.mget(keys) == want
    assert await cache._async.mget(keys) == want
    assert cache._sync._reads[1] is direct
    assert cache._async._reads[1] is direct
    await cache.aclose()
    cache.close()


# -- errors: mapped, retried on run()'s schedule, connections dropped ---------------------------


def _pool_state(pool: Any) -> tuple[int, int]:
    """(connections in use, connections idle in the pool)."""
    return len(pool._in_use_connections), len(pool._available_connections)


@pytest.mark.parametrize("direct", [True, False])
def test_a_lost_reply_is_retried_on_a_new_connection(
    direct: bool,
    proxy: FaultProxy,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    redis_client.set("dr:a", b"1")
    cache = _cache(proxy)
    sync = cache._sync
    assert sync.mget(["dr:a"]) == [b"1"]
    pool: Any = sync.client.connection_pool
    (conn,) = pool._available_connections
    sock = conn._sock
    proxy.drop_replies(1)  # the server answers; the answer never arrives
    assert sync.mget(["dr:a", "dr:b"]) == [b"1", None]  # the retry's answer
    assert _pool_state(pool) == (0, 1)
    # the connection that timed out was dropped: no late reply can answer a later read
    assert conn._sock is not sock
    assert sync.mget(["dr:b", "dr:a"]) == [None, b"1"]
    cache.close()


@pytest.mark.parametrize("direct", [True, False])
def test_without_retries_a_lost_reply_raises_mapped(
    direct: bool,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    cache = _cache(proxy, retry=rcache.RetryPolicy(attempts=1))
    sync = cache._sync
    sync.mget(["dr:a"])
    pool: Any = sync.client.connection_pool
    proxy.drop_replies(1)
    with pytest.raises(rcache.BackendUnavailableError) as info:
        sync.mget(["dr:a"])
    assert isinstance(info.value.__cause__, redis.TimeoutError)
    assert _pool_state(pool) == (0, 1)
    assert sync.mget(["dr:a"]) == [None]
    cache.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_refused_server_is_retried_then_unavailable(
    direct: bool,
    redis_server_factory: Callable[[], RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="dr")
    sync = cache._sync
    assert sync.mget(["dr:a"]) == [None]
    server.kill()
    calls = []
    real = _redis._retry_options

    def counting(policy: Any, client: Any) -> Any:
        calls.append(policy)
        return real(policy, client)

    monkeypatch.setattr(_redis, "_retry_options", counting)
    with pytest.raises(rcache.BackendUnavailableError):
        sync.mget(["dr:a"])
    assert len(calls) == 1  # the rest of the schedule ran once, after the first try
    assert _pool_state(sync.client.connection_pool)[0] == 0
    cache.close()


def test_an_error_reply_keeps_the_connection(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    redis_client.execute_command(
        "ACL", "SETUSER", "dr-nomget", "on", ">pw", "~*", "&*", "+@all", "-mget"
    )
    try:
        url = f"redis://dr-nomget:pw@127.0.0.1:{redis_server.port}/0"
        cache = rcache.Cache(url, prefix="dr")
        sync = cache._sync
        sync.client.ping()
        pool: Any = sync.client.connection_pool
        (conn,) = pool._available_connections
        sock = conn._sock
        with pytest.raises(rcache.BackendMisconfiguredError):
            sync.mget(["dr:a"])  # NOPERM: not retried, the connection is in sync
        assert _pool_state(pool) == (0, 1)
        assert conn._sock is sock
        assert sync.client.ping()
        cache.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", "dr-nomget")


@pytest.mark.parametrize("direct", [True, False])
async def test_async_lost_reply_and_refusal(
    direct: bool,
    proxy: FaultProxy,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    redis_client.set("dr:a", b"1")
    cache = _cache(proxy)
    arun = cache._async
    assert await arun.mget(["dr:a"]) == [b"1"]
    pool: Any = arun.client.connection_pool
    proxy.drop_replies(1)
    assert await arun.mget(["dr:a"]) == [b"1"]  # retried
    assert _pool_state(pool) == (0, 1)
    proxy.cut()
    with pytest.raises(rcache.BackendUnavailableError):
        await arun.mget(["dr:a"])
    assert _pool_state(pool)[0] == 0
    proxy.restore()
    assert await arun.mget(["dr:a", "dr:b"]) == [b"1", None]
    await cache.aclose()


# -- cancellation ------------------------------------------------------------------------


def _mgets(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def _apoll(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("direct", [True, False])
async def test_a_cancelled_read_drops_its_connection(
    direct: bool,
    proxy: FaultProxy,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct(direct, monkeypatch)
    redis_client.set("dr:a", b"1")
    cache = rcache.Cache(proxy.url + "?socket_timeout=5", prefix="dr")
    arun = cache._async
    await arun.mget(["dr:a"])
    pool: Any = arun.client.connection_pool
    (conn,) = pool._available_connections
    sent = _mgets(redis_client) + 1
    proxy.drop_replies()  # the read waits: cancel it there
    task = asyncio.get_running_loop().create_task(arun.mget(["dr:a"]))
    await _apoll(lambda: _mgets(redis_client) >= sent)  # the server has answered
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _pool_state(pool) == (0, 1)
    assert not conn.is_connected  # its reply may still come: never reused as it is
    proxy.restore()
    redis_client.set("dr:a", b"2")
    assert await arun.mget(["dr:a"]) == [b"2"]
    await cache.aclose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
@pytest.mark.parametrize("direct", [True, False])
async def test_a_swallowed_cancellation_is_raised_after_the_read(
    direct: bool,
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before 3.12 ``wait_for`` (around redis-py's send) can swallow a cancellation:
    the read completes, then the cancellation is raised, the connection pooled."""
    _direct(direct, monkeypatch)
    redis_client.set("dr:a", b"1")
    cache = rcache.Cache(redis_url, prefix="dr")
    arun = cache._async
    await arun.mget(["dr:a"])
    pool: Any = arun.client.connection_pool
    real = redis.asyncio.Connection.send_packed_command

    async def swallowing(self: Any, command: Any, check_health: bool = True) -> None:
        await real(self, command, check_health)
        me: Any = asyncio.current_task()
        me.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # lost, as gh-86296's wait_for lost it; cancelling() stays 1

    monkeypatch.setattr(redis.asyncio.Connection, "send_packed_command", swallowing)
    me: Any = asyncio.current_task()
    with pytest.raises(asyncio.CancelledError):
        await arun.mget(["dr:a"])
    assert me.uncancel() == 0
    assert _pool_state(pool) == (0, 1)
    monkeypatch.undo()
    assert await arun.mget(["dr:a"]) == [b"1"]  # the connection was in sync
    await cache.aclose()


# -- the breaker counts a failed hit as before ------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_failed_hits_count_and_open_the_breaker_as_before(
    direct: bool, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    _direct(direct, monkeypatch)
    cache = _cache(proxy, breaker=FAST_BREAKER, retry=rcache.RetryPolicy(attempts=1))
    computed = []

    @cache.cached(ttl=60, name="dr.f", stampede=False)
    def f(x: int) -> int:
        computed.append(x)
        return x * 10

    assert f(1) == 10 and f(1) == 10  # stored, then a hit through the fast read
    assert computed == [1]
    m: Any = cache.metrics
    assert m.count("cache_gets", "dr.f", "hit") == 1
    proxy.cut()
    assert f(1) == 10  # fails open: computed without the cache
    assert cache.breaker.state == 0
    assert m.count("cache_errors", "dr.f", "get", "ConnectionError") == 1
    assert f(1) == 10
    assert cache.breaker.state == 1  # two unavailability errors: open
    assert m.count("cache_errors", "dr.f", "get", "ConnectionError") == 2
    assert f(1) == 10  # skipped at once
    assert m.count("cache_errors", "dr.f", "get", "CircuitOpen") == 1
    assert m.count("cache_gets", "dr.f", "miss") == 4  # the first call's, and 3
    assert computed == [1, 1, 1, 1]
    cache.close()


# -- fork generation -----------------------------------------------------------------------


def test_nothing_is_registered_at_import() -> None:
    code = (
        "import rcache, rcache._redis as r; "
        "assert not r._WATCHING[0] and r._FORKS == [0] and r._PID == [0]; "
        "rcache.Cache('redis://127.0.0.1:1/0')._sync.client; "
        "import os; assert r._WATCHING[0] and r._PID[0] == os.getpid()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_forked_child_makes_its_own_client(redis_url: str) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    cache = rcache.Cache(redis_url, prefix="dr")
    parent = cache._sync.client
    assert cache._sync.mget(["dr:a"]) == [None]
    assert _redis.process_id() == os.getpid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12)
        pid = os.fork()
    if pid == 0:  # the child: exit at once with what it saw
        ok = (
            _redis.process_id() == os.getpid()
            and cache._sync.mget(["dr:a"]) == [None]
            and cache._sync.client is not parent
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache._sync.client is parent
    cache.close()


def test_the_fork_hook_makes_new_clients(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="dr")
    sync = cache._sync
    before = sync.client, sync.blocking_client
    generation = _redis._FORKS[0]
    try:
        _redis._forked()  # as in a forked child
        assert sync.client is not before[0]
        assert sync.blocking_client is not before[1]
        assert sync.mget(["dr:a"]) == [None]
        cache.close()
    finally:
        _redis._FORKS[0] = generation
    for client in before:
        client.close()
