"""Cache faults that need several processes (issue 14): a writer whose clock runs an
hour ahead, and stampede waiters whose Redis is stopped (SIGSTOP) while they wait."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

import rcache
from rcache.testing import RedisServer, wait_until

CTX = mp.get_context("fork")
HOUR = 3600.0


def redis_now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1e6


def blocked_on_blmove(client: redis.Redis) -> int:
    """How many clients are blocked in BLMOVE right now (CLIENT LIST flag "b")."""
    return sum(
        c.get("cmd") == "blmove" and "b" in c.get("flags", "")
        for c in client.client_list()
    )


# -- item 6: a writer whose clock runs an hour ahead -------------------------------------
# (stale_if_error=60 keeps entries in Redis for 60 s: only freshness can expire them)


def _skewed_writer(url: str, skew: float, is_async: bool) -> None:
    real = time.time
    time.time = lambda: real() + skew  # this process's wall clock is wrong
    cache = rcache.Cache(url, prefix="wskew")
    counter = redis.Redis.from_url(url)

    if is_async:

        @cache.cached(ttl=0.5, stale_if_error=60, name="af")
        async def af() -> str:
            counter.incr("runs")
            return "value"

        async def main() -> None:
            await af()
            await cache.aclose()

        asyncio.run(main())
    else:

        @cache.cached(ttl=0.5, stale_if_error=60, name="f")
        def f() -> str:
            counter.incr("runs")
            return "value"

        f()


@pytest.mark.parametrize("is_async", [False, True])
def test_writer_clock_ahead_does_not_keep_entries_fresh(
    redis_server: RedisServer, redis_url: str, is_async: bool
) -> None:
    client = redis_server.client()
    writer = CTX.Process(target=_skewed_writer, args=(redis_url, HOUR, is_async))
    writer.start()
    writer.join(30)
    assert writer.exitcode == 0
    written = redis_now(client)
    cache = rcache.Cache(redis_url, prefix="wskew")
    runs: list[int] = []

    if is_async:

        @cache.cached(ttl=0.5, stale_if_error=60, name="af")
        async def af() -> str:
            runs.append(1)
            return "value"

        async def once() -> str:
            try:
                return await af()  # type: ignore[no-any-return]
            finally:
                await cache.aclose()  # this loop's client

        def call() -> str:
            return asyncio.run(once())
    else:

        @cache.cached(ttl=0.5, stale_if_error=60, name="f")
        def f() -> str:
            runs.append(1)
            return "value"

        call = f

    assert call() == "value" and runs == []  # fresh: the writer's entry is served
    wait_until(lambda: redis_now(client) > written + 0.6, message="ttl to pass")
    # before the fix the entry was dated an hour ahead and served fresh for that hour
    assert call() == "value" and runs == [1]
    cache.close()
    client.close()


# -- item 4 (cache half): waits keep their budget while Redis is stopped ----------------


def _holder(url: str) -> None:
    cache = rcache.Cache(url, prefix="hung")
    r = redis.Redis.from_url(url)

    @cache.cached(ttl=60, lease_ttl=60, name="f")
    def f() -> str:
        r.set("holder-started", 1)
        time.sleep(120)  # killed long before this ends
        return "holder"

    f()


@pytest.fixture
def holder(
    redis_server_factory: Callable[[], RedisServer],
) -> Iterator[tuple[RedisServer, redis.Redis]]:
    server = redis_server_factory()
    client = server.client()
    proc = CTX.Process(target=_holder, args=(server.url,))
    proc.start()
    try:
        wait_until(lambda: client.get("holder-started"), 20, message="holder")
        yield server, client
    finally:
        server.resume()
        proc.kill()
        proc.join(10)
        client.close()


BUDGET = 1.5
BOUND = 1.0  # what a wait may overrun its budget by (0.25 s margin + a loaded machine)


def test_stampede_waits_keep_their_budget_with_redis_stopped(
    holder: tuple[RedisServer, redis.Redis],
) -> None:
    server, client = holder
    cache = rcache.Cache(server.url, prefix="hung")

    @cache.cached(ttl=60, wait=BUDGET, name="f")
    def f() -> str:
        return "waiter"

    @cache.cached(ttl=60, wait=BUDGET, name="f")
    async def af() -> str:
        return "async waiter"

    took: dict[str, float] = {}
    values: dict[str, str] = {}

    def run(name: str, call: Callable[[], str]) -> None:
        start = time.monotonic()
        values[name] = call()
        took[name] = time.monotonic() - start

    async def aonce() -> str:
        try:
            return await af()  # type: ignore[no-any-return]
        finally:
            await cache.aclose()

    threads = [
        threading.Thread(target=run, args=("sync", f)),
        threading.Thread(target=run, args=("async", lambda: asyncio.run(aonce()))),
    ]
    for t in threads:
        t.start()
    wait_until(lambda: blocked_on_blmove(client) == 2, 10, message="both waiting")
    server.pause()  # SIGSTOP: Redis keeps its sockets but answers nothing
    try:
        for t in threads:
            t.join(BUDGET + 10)
    finally:
        server.resume()
    assert values == {"sync": "waiter", "async": "async waiter"}
    # before the fix: the wait lasted until Redis came back (the blocking client's
    # socket timeout is 30 s), e.g. 10.9 s for a 6 s budget
    assert took["sync"] < BUDGET + BOUND, took
    assert took["async"] < BUDGET + BOUND, took
    errors = cache.metrics
    assert isinstance(errors, rcache.InMemoryMetrics)
    assert errors.count("cache_errors", "f", "get", "BackendUnavailableError") == 2
    cache.close()
