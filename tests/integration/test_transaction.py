"""cache.transaction / cache.atransaction and cache.update / cache.aupdate on real Redis."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import pytest
import redis

import rcache
from rcache._transaction import TransactionStats
from rcache.testing import RedisServer, wait_until


class OutOfStockError(Exception):
    pass


@pytest.fixture
async def acache(redis_url: str) -> AsyncIterator[rcache.Cache]:
    c = rcache.Cache(redis_url, prefix="test")
    yield c
    await c.aclose()
    c.close()


@pytest.fixture
def own_server(
    redis_server_factory: Callable[[], RedisServer],
) -> Iterator[tuple[RedisServer, redis.Redis]]:
    server = redis_server_factory()
    admin = server.client()
    yield server, admin
    admin.close()


def take_one(pipe: Any) -> None:
    stock = int(pipe.get("stock:42") or 0)
    if stock <= 0:
        raise OutOfStockError()
    pipe.multi()
    pipe.set("stock:42", stock - 1)


async def atake_one(pipe: Any) -> None:
    stock = int(await pipe.get("stock:42") or 0)
    if stock <= 0:
        raise OutOfStockError()
    pipe.multi()
    pipe.set("stock:42", stock - 1)


class Mode:
    """Runs one behaviour test in sync or async mode.

    ``await mode(obj, "transaction", ...)`` calls ``obj.transaction(...)``, or awaits
    ``obj.atransaction(...)``. The caller's function is written once as a generator
    that yields each pipeline read (``stock = yield pipe.get(k)``); ``mode.fn(gen)``
    turns it into a plain function (a read answers at once) or an ``async def`` (it
    awaits each read).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    async def __call__(self, obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.name == "sync":
            return getattr(obj, method)(*args, **kwargs)
        return await getattr(obj, "a" + method)(*args, **kwargs)

    async def transaction(self, cache: rcache.Cache, gen: Body, **kwargs: Any) -> Any:
        return await self(cache, "transaction", self.fn(gen), **kwargs)

    def fn(self, gen: Body) -> Callable[[Any], Any]:
        def fn(pipe: Any) -> Any:
            steps, reply = gen(pipe), None
            try:
                while True:
                    reply = steps.send(reply)
            except StopIteration as stop:
                return stop.value

        async def afn(pipe: Any) -> Any:
            steps, reply = gen(pipe), None
            try:
                while True:
                    reply = await steps.send(reply)
            except StopIteration as stop:
                return stop.value

        return fn if self.name == "sync" else afn


#: A caller's transaction function written for both modes (see Mode).
Body = Callable[[Any], Generator[Any, Any, Any]]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Mode:
    return Mode(request.param)


def taking_one(pipe: Any) -> Generator[Any, Any, None]:
    """take_one for both modes."""
    stock = int((yield pipe.get("stock:42")) or 0)
    if stock <= 0:
        raise OutOfStockError()
    pipe.multi()
    pipe.set("stock:42", stock - 1)


# -- transaction: happy path ------------------------------------------------------------


def test_transaction_commits_and_returns_exec_replies(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 3)
    stats = TransactionStats()

    def fn(pipe: Any) -> None:
        stock = int(pipe.get("stock:42"))
        pipe.multi()
        pipe.set("stock:42", stock - 1)
        pipe.incr("sold:42")

    assert cache.transaction(fn, watch=["stock:42"], stats=stats) == [True, 1]
    assert redis_client.get("stock:42") == b"2"
    assert (stats.calls, stats.commits, stats.attempts, stats.conflicts) == (1, 1, 1, 0)
    # Keys are the caller's own: no prefix was added.
    assert redis_client.exists("test:k:stock:42") == 0


async def test_atransaction_commits_and_returns_exec_replies(
    acache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 3)
    stats = TransactionStats()
    assert await acache.atransaction(atake_one, watch=["stock:42"], stats=stats) == [
        True
    ]
    assert redis_client.get("stock:42") == b"2"
    assert (stats.calls, stats.commits, stats.attempts) == (1, 1, 1)


# -- a raising function aborts --------------------------------------------------------


async def test_raising_function_aborts_writes_nothing_and_is_not_retried(
    mode: Mode, cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 1)
    calls = 0
    error = OutOfStockError("sold out")

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        nonlocal calls
        calls += 1
        yield pipe.get("stock:42")
        pipe.multi()
        pipe.set("stock:42", 999)  # queued, must never be applied
        pipe.set("other", 1)
        raise error

    with pytest.raises(OutOfStockError) as info:
        await mode.transaction(cache, fn, watch=["stock:42"], retries=5)
    assert info.value is error  # the caller's exception, unchanged
    assert calls == 1
    assert redis_client.get("stock:42") == b"1"
    assert redis_client.exists("other") == 0
    # The pooled connection was UNWATCHed and reset: the next transaction is normal.
    assert await mode.transaction(cache, taking_one, watch=["stock:42"]) == [True]
    assert redis_client.get("stock:42") == b"0"
    with pytest.raises(OutOfStockError):
        await mode.transaction(cache, taking_one, watch=["stock:42"])
    assert redis_client.get("stock:42") == b"0"


@pytest.mark.parametrize(
    "error", [OSError("disk full"), TimeoutError("my own"), ConnectionError("my own")]
)
def test_callers_os_errors_are_not_mistaken_for_redis_outages(
    cache: rcache.Cache, redis_client: redis.Redis, error: Exception
) -> None:
    redis_client.set("stock:42", 1)
    calls = 0

    def fn(pipe: Any) -> None:
        nonlocal calls
        calls += 1
        pipe.get("stock:42")
        raise error

    with pytest.raises(type(error)) as info:
        cache.transaction(fn, watch=["stock:42"])
    assert info.value is error
    assert calls == 1


# -- conflicts ----------------------------------------------------------------------------


def _interfering(redis_client: redis.Redis, times: int) -> Callable[[Any], None]:
    """A function whose first ``times`` runs see another client change the key."""
    runs = 0

    def fn(pipe: Any) -> None:
        nonlocal runs
        runs += 1
        stock = int(pipe.get("stock:42"))
        if runs <= times:
            redis_client.incr("stock:42", 100)  # a concurrent writer
        pipe.multi()
        pipe.set("stock:42", stock - 1)

    return fn


def test_conflict_is_retried_and_the_retry_sees_the_new_value(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 10)
    stats = TransactionStats()
    cache.transaction(_interfering(redis_client, 2), watch=["stock:42"], stats=stats)
    # 10 + 100 + 100 from the other writer, then our decrement on the fresh value.
    assert redis_client.get("stock:42") == b"209"
    assert (stats.attempts, stats.conflicts, stats.commits, stats.last_attempts) == (
        3,
        2,
        1,
        3,
    )


async def test_exception_on_a_retry_propagates_unchanged(
    mode: Mode, cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    """The last item is bought by someone else between our read and our EXEC: the
    retry sees 0 and the caller gets OutOfStockError, not a conflict error."""
    redis_client.set("stock:42", 1)
    runs = 0

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        nonlocal runs
        runs += 1
        stock = int((yield pipe.get("stock:42")))
        if stock <= 0:
            raise OutOfStockError()
        redis_client.decr("stock:42")  # the concurrent buyer
        pipe.multi()
        pipe.set("stock:42", stock - 1)

    stats = TransactionStats()
    with pytest.raises(OutOfStockError):
        await mode.transaction(cache, fn, watch=["stock:42"], stats=stats)
    assert runs == 2
    assert redis_client.get("stock:42") == b"0"
    assert (stats.conflicts, stats.commits, stats.attempts) == (1, 0, 2)


def test_retry_budget_exhausted_raises_conflict_error_and_writes_nothing(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 10)
    stats = TransactionStats()
    with pytest.raises(rcache.TransactionConflictError) as info:
        cache.transaction(
            _interfering(redis_client, 10**6),
            watch=["stock:42"],
            retries=3,
            stats=stats,
        )
    assert info.value.keys == ["stock:42"]
    assert info.value.attempts == 4
    assert "4 attempts" in str(info.value)
    assert isinstance(info.value, rcache.TransactionError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.keys, copy.attempts) == (["stock:42"], 4)
    # Only the other writer's changes: none of our four SETs was applied.
    assert redis_client.get("stock:42") == b"410"
    assert (stats.attempts, stats.conflicts, stats.commits) == (4, 4, 0)


def test_retries_zero_means_one_attempt(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 10)
    with pytest.raises(rcache.TransactionConflictError) as info:
        cache.transaction(_interfering(redis_client, 1), watch=["stock:42"], retries=0)
    assert info.value.attempts == 1


def test_retries_are_bounded_by_total_time(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 10)
    start = time.monotonic()
    with pytest.raises(rcache.TransactionConflictError) as info:
        cache.transaction(
            _interfering(redis_client, 10**6),
            watch=["stock:42"],
            retries=100_000,
            max_time=0.3,
        )
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 3.0
    assert 1 < info.value.attempts < 100_001


async def test_async_conflicts_retry_then_exhaust(
    acache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("stock:42", 10)
    runs = 0

    async def fn(pipe: Any) -> None:
        nonlocal runs
        runs += 1
        stock = int(await pipe.get("stock:42"))
        redis_client.incr("stock:42", 100)
        pipe.multi()
        pipe.set("stock:42", stock - 1)

    stats = TransactionStats()
    with pytest.raises(rcache.TransactionConflictError) as info:
        await acache.atransaction(fn, watch=["stock:42"], retries=2, stats=stats)
    assert (info.value.keys, info.value.attempts, runs) == (["stock:42"], 3, 3)
    assert redis_client.get("stock:42") == b"310"

    runs = 0

    async def once(pipe: Any) -> None:
        nonlocal runs
        runs += 1
        stock = int(await pipe.get("stock:42"))
        if runs == 1:
            redis_client.incr("stock:42", 100)
        pipe.multi()
        pipe.set("stock:42", stock - 1)

    await acache.atransaction(once, watch=["stock:42"], stats=stats)
    assert redis_client.get("stock:42") == b"409"
    assert stats.last_attempts == 2


def test_prefixed_watches_the_cache_namespace(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    cache.set("cart:7", {"qty": 1}, ttl=60)
    runs = 0

    def fn(pipe: Any) -> None:
        nonlocal runs
        runs += 1
        assert pipe.exists("test:k:cart:7") == 1
        if runs == 1:
            cache.set("cart:7", {"qty": 2}, ttl=60)  # touches the watched key
        pipe.multi()
        pipe.set("audit", runs)

    cache.transaction(fn, watch=["cart:7"], prefixed=True)
    assert runs == 2
    assert redis_client.get("audit") == b"2"


def test_no_watch_runs_multi_exec_once(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    def fn(pipe: Any) -> None:
        pipe.multi()
        pipe.incr("n")
        pipe.incr("n")

    assert cache.transaction(fn) == [1, 2]


# -- errors are mapped, transactions fail closed -------------------------------------------


async def test_redis_error_in_function_is_mapped(
    mode: Mode, cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.rpush("alist", 1)

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        yield pipe.get("alist")  # WRONGTYPE

    with pytest.raises(rcache.BackendError) as info:
        await mode.transaction(cache, fn, watch=["alist"])
    assert not isinstance(info.value, rcache.BackendUnavailableError)
    assert isinstance(info.value.original, redis.ResponseError)

    def queued_error(pipe: Any) -> Generator[Any, Any, None]:
        pipe.multi()
        pipe.incr("alist")  # fails inside EXEC
        yield from ()

    with pytest.raises(rcache.BackendError):
        await mode.transaction(cache, queued_error, watch=["alist"])


def test_transaction_fails_closed_when_redis_is_down(
    own_server: tuple[RedisServer, redis.Redis],
) -> None:
    server, _ = own_server
    cache = rcache.Cache(server.url, prefix="test")
    server.kill()
    calls = 0

    def fn(pipe: Any) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(rcache.BackendUnavailableError):
        cache.transaction(fn, watch=["k"])
    with pytest.raises(rcache.BackendUnavailableError):
        cache.update("k", lambda v: 1, ttl=10)
    assert calls == 0
    cache.close()


async def test_connection_lost_after_exec_is_not_retried(
    mode: Mode, own_server: tuple[RedisServer, redis.Redis]
) -> None:
    """The EXEC reached Redis but its reply did not reach us: never run it again.

    redis-py reports this as a WatchError (a "conflict"), and ``Redis.transaction``
    would retry it: here that would decrement twice.
    """
    server, admin = own_server
    admin.set("stock:42", 5)
    cache = rcache.Cache(
        server.url, prefix="test", redis_options={"socket_timeout": 0.3}
    )
    calls = 0

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        nonlocal calls
        calls += 1
        stock = int((yield pipe.get("stock:42")))
        pipe.multi()
        pipe.set("stock:42", stock - 1)
        server.pause()  # EXEC will be sent, and its reply will time out

    try:
        with pytest.raises(rcache.BackendUnavailableError, match="after EXEC"):
            await mode.transaction(cache, fn, watch=["stock:42"], retries=10)
    finally:
        server.resume()
    assert calls == 1
    # Redis processes the EXEC it had received: applied once, and only once.
    wait_until(
        lambda: admin.get("stock:42") == b"4", timeout=10, message="EXEC applied"
    )
    assert admin.get("stock:42") == b"4"
    assert await mode.transaction(cache, taking_one, watch=["stock:42"]) == [True]
    assert admin.get("stock:42") == b"3"
    await cache.aclose()
    cache.close()


BUSY_MS = 900


def busy(pipe: Any) -> None:
    pipe.execute_command("DEBUG", "SLEEP", BUSY_MS / 1000)


@pytest.fixture
def debug_server() -> Iterator[tuple[RedisServer, redis.Redis]]:
    with RedisServer(extra_args=["--enable-debug-command", "yes"]) as server:
        admin = server.client()
        yield server, admin
        admin.close()


EXEC_READ_TIMEOUT = 0.6


async def test_committed_exec_reported_as_watch_error_is_not_retried(
    mode: Mode, debug_server: tuple[RedisServer, redis.Redis]
) -> None:
    """redis-py turns "reply lost after EXEC" into ``WatchError`` when it can reconnect
    (``Pipeline._disconnect_raise_on_watching``); ``Redis.transaction`` then runs the
    function again and applies it twice. rcache must raise instead.
    """
    server, admin = debug_server
    admin.set("stock:42", 5)
    cache = rcache.Cache(
        server.url, prefix="test", redis_options={"socket_timeout": EXEC_READ_TIMEOUT}
    )
    calls = 0

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        nonlocal calls
        calls += 1
        stock = int((yield pipe.get("stock:42")))
        pipe.multi()
        pipe.set("stock:42", stock - 1)
        busy(pipe)

    with pytest.raises(rcache.BackendUnavailableError, match="after EXEC") as info:
        await mode.transaction(cache, fn, watch=["stock:42"], retries=10)
    assert isinstance(info.value.__cause__, redis.WatchError)
    assert calls == 1
    wait_until(
        lambda: admin.get("stock:42") == b"4", timeout=10, message="EXEC applied"
    )
    assert admin.get("stock:42") == b"4"
    await cache.aclose()
    cache.close()


async def test_connection_lost_before_exec_is_retried(
    mode: Mode, own_server: tuple[RedisServer, redis.Redis]
) -> None:
    server, admin = own_server
    admin.set("stock:42", 5)
    cache = rcache.Cache(server.url, prefix="test")
    runs = 0

    def fn(pipe: Any) -> Generator[Any, Any, None]:
        nonlocal runs
        runs += 1
        if runs == 1:
            # The server drops our WATCHing connection before we send anything else.
            admin.client_kill_filter(_id=(yield pipe.client_id()))
        stock = int((yield pipe.get("stock:42")))
        pipe.multi()
        pipe.set("stock:42", stock - 1)

    stats = TransactionStats()
    assert await mode.transaction(cache, fn, watch=["stock:42"], stats=stats) == [True]
    assert runs == 2
    assert admin.get("stock:42") == b"4"
    assert (stats.transient_retries, stats.conflicts, stats.attempts) == (1, 0, 2)
    await cache.aclose()
    cache.close()


async def test_transaction_right_after_a_redis_restart(
    mode: Mode, own_server: tuple[RedisServer, redis.Redis]
) -> None:
    """The stale pooled connection fails at WATCH, before anything was written: the
    attempt is retried on a new connection (a safe, transient retry)."""
    server, admin = own_server
    cache = rcache.Cache(server.url, prefix="test")
    admin.set("stock:42", 5)
    assert await mode.transaction(cache, taking_one, watch=["stock:42"]) == [True]
    admin.close()
    await asyncio.to_thread(server.restart)  # the pooled connection is dead
    admin = server.client()
    admin.set("stock:42", 7)
    stats = TransactionStats()
    assert await mode.transaction(
        cache, taking_one, watch=["stock:42"], stats=stats
    ) == [True]
    assert admin.get("stock:42") == b"6"
    assert stats.commits == 1
    admin.close()
    await cache.aclose()
    cache.close()


def test_transient_retries_follow_the_cache_retry_policy(
    own_server: tuple[RedisServer, redis.Redis],
) -> None:
    server, admin = own_server
    admin.set("stock:42", 5)
    cache = rcache.Cache(
        server.url, prefix="test", retry=rcache.RetryPolicy(attempts=1)
    )

    def fn(pipe: Any) -> None:
        admin.client_kill_filter(_id=pipe.client_id())
        pipe.get("stock:42")

    with pytest.raises(rcache.BackendUnavailableError):
        cache.transaction(fn, watch=["stock:42"], retries=10)
    assert admin.get("stock:42") == b"5"
    cache.close()


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"watch": "stock:42"}, "list of keys"),
        ({"watch": [""]}, "non-empty"),
        ({"watch": ["k"], "retries": -1}, "retries"),
        ({"watch": ["k"], "retries": 1.5}, "retries"),
        ({"watch": ["k"], "max_time": 0}, "max_time"),
    ],
)
def test_bad_arguments_raise_configuration_error(
    cache: rcache.Cache, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(rcache.ConfigurationError, match=match):
        cache.transaction(take_one, **kwargs)


# -- update --------------------------------------------------------------------------------


def test_update_creates_replaces_and_is_visible_to_get(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    seen: list[Any] = []

    def add_qty(cart: Any) -> Any:
        seen.append(cart)
        return {**(cart or {}), "qty": (cart or {}).get("qty", 0) + 3}

    assert cache.update("cart:7", add_qty, ttl=600) == {"qty": 3}
    assert cache.update("cart:7", add_qty, ttl=600) == {"qty": 6}
    assert seen == [None, {"qty": 3}]
    assert cache.get("cart:7") == {"qty": 6}
    assert 590_000 < redis_client.pttl("test:k:cart:7") <= 600_000


def test_update_uses_the_cache_default_ttl_and_requires_one(redis_url: str) -> None:
    with_default = rcache.Cache(redis_url, prefix="test", ttl="1m")
    assert with_default.update("n", lambda v: (v or 0) + 1) == 1
    with_default.close()
    without = rcache.Cache(redis_url, prefix="test")
    with pytest.raises(rcache.ConfigurationError, match="ttl"):
        without.update("n", lambda v: (v or 0) + 1)
    without.close()


def test_update_treats_undecodable_value_as_missing(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    redis_client.set("test:k:cart:7", b"not an envelope")
    assert cache.update("cart:7", lambda v: {"was": v}, ttl=60) == {"was": None}
    assert cache.get("cart:7") == {"was": None}


def test_update_function_error_and_unserializable_value_write_nothing(
    cache: rcache.Cache,
) -> None:
    cache.set("cart:7", {"qty": 1}, ttl=60)

    def boom(cart: Any) -> Any:
        raise OutOfStockError()

    with pytest.raises(OutOfStockError):
        cache.update("cart:7", boom, ttl=60)
    with pytest.raises(rcache.SerializationError):
        cache.update("cart:7", lambda cart: object(), ttl=60)
    assert cache.get("cart:7") == {"qty": 1}


def test_update_retries_on_concurrent_set(cache: rcache.Cache) -> None:
    cache.set("cart:7", {"qty": 1}, ttl=60)
    runs = 0
    stats = TransactionStats()

    def bump(cart: Any) -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:
            cache.set("cart:7", {"qty": 10}, ttl=60)  # a concurrent writer
        return {**cart, "qty": cart["qty"] + 1}

    assert cache.update("cart:7", bump, ttl=60, stats=stats) == {"qty": 11}
    assert cache.get("cart:7") == {"qty": 11}
    assert (runs, stats.conflicts) == (2, 1)

    with pytest.raises(rcache.TransactionConflictError) as info:
        cache.update(
            "cart:7",
            lambda cart: cache.set("cart:7", {"qty": 0}, ttl=60) and cart,
            ttl=60,
            retries=2,
        )
    assert (info.value.keys, info.value.attempts) == (["cart:7"], 3)


async def test_aupdate(acache: rcache.Cache, redis_client: redis.Redis) -> None:
    assert await acache.aupdate(
        "cart:7", lambda c: {**(c or {}), "qty": 3}, ttl=600
    ) == {"qty": 3}
    runs = 0

    def bump(cart: Any) -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:
            redis_client.set("test:k:cart:7", b"garbage")  # concurrent, undecodable
        return {**(cart or {}), "n": runs}

    assert await acache.aupdate("cart:7", bump, ttl=600) == {"n": 2}
    assert await acache.aget("cart:7") == {"n": 2}
    assert acache.get("cart:7") == {"n": 2}

    def boom(cart: Any) -> Any:
        raise OutOfStockError()

    with pytest.raises(OutOfStockError):
        await acache.aupdate("cart:7", boom, ttl=60)
    assert await acache.aget("cart:7") == {"n": 2}
