"""Stampede protection across real processes on a real redis-server."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import rcache
from rcache.testing import RedisServer, wait_until

CTX = mp.get_context("fork")


def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def blocked_on_blmove(client: redis.Redis) -> bool:
    """Is some client blocked in BLMOVE right now (CLIENT LIST flag "b")?"""
    return any(
        c.get("cmd") == "blmove" and "b" in c.get("flags", "")
        for c in client.client_list()
    )


def _stampede_worker(url: str, callers: int, barrier: Any, out: Any) -> None:
    cache = rcache.Cache(url, prefix="st")
    counter = redis.Redis.from_url(url)

    @cache.cached(ttl=60, name="slow")
    def slow(x: int) -> dict[str, int]:
        counter.incr("runs")
        time.sleep(0.2)
        return {"x": x}

    # A process reads Redis's clock with its first read (cache_read.lua); do it before
    # the count starts, so that the count below is the stampede's alone.
    cache.cached(ttl=60, name="warm")(lambda: 1)()
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


def test_cold_key_runs_once_across_processes_without_polling(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    client = server.client()
    procs, callers = 4, 50
    barrier = CTX.Barrier(procs + 1)  # the workers and this test, which resets stats
    out = CTX.Queue()
    # Load rcache's scripts once (a fresh server answers the first EVALSHA of each
    # process with NOSCRIPT), so that the count below is the stampede's alone.
    warm = rcache.Cache(server.url, prefix="warm")
    warm.cached(ttl=5)(lambda: 1)()
    warm.close()
    workers = [
        CTX.Process(target=_stampede_worker, args=(server.url, callers, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    wait_until(lambda: barrier.n_waiting == procs, timeout=30, message="workers warm")
    client.config_resetstat()
    barrier.wait()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    stats = commandstats(client)
    assert int(client.get("runs") or 0) == 1  # the function ran once in all
    assert all(r == [{"x": 1}] * callers for r in results)
    # the whole stampede: per process one MGET + one claim, the winner one store, each
    # loser one BLMOVE + one MGET; nothing that polls
    client_commands = (
        stats.get("mget", 0) + stats.get("evalsha", 0) + stats.get("blmove", 0)
    )
    assert stats.get("mget", 0) <= 2 * procs
    assert (
        stats.get("evalsha", 0) <= procs + 1 + 2
    )  # claims + store (+ NOSCRIPT reloads)
    assert stats.get("blmove", 0) <= procs - 1 + 2
    assert client_commands <= 20, stats
    client.close()


def _holder(url: str) -> None:
    cache = rcache.Cache(url, prefix="kill")
    r = redis.Redis.from_url(url)

    @cache.cached(ttl=60, lease_ttl=1.0, wait=10, name="f")
    def f() -> str:
        r.set("holder-started", os.getpid())
        time.sleep(60)  # killed long before this ends
        return "holder"

    f()


def test_holder_killed_mid_compute_waiter_takes_over_within_lease(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    client = server.client()
    holder = CTX.Process(target=_holder, args=(server.url,))
    holder.start()
    wait_until(
        lambda: client.get("holder-started"), timeout=20, message="holder to start"
    )

    cache = rcache.Cache(server.url, prefix="kill")

    @cache.cached(ttl=60, lease_ttl=1.0, wait=10, name="f")
    def f() -> str:
        return "waiter"

    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append((f(), time.monotonic())))
    t.start()
    # the waiter is blocked on the holder's lease
    wait_until(lambda: client.exists("kill:c:f:[]:lease"), timeout=5, message="lease")
    # the waiter blocks on the signal list (a BLMOVE), it does not poll
    wait_until(
        lambda: blocked_on_blmove(client), timeout=10, message="a blocked waiter"
    )
    assert not result
    os.kill(holder.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    holder.join(10)
    t.join(15)
    assert result and result[0][0] == "waiter"
    took = result[0][1] - killed_at
    assert took < 1.0 + 0.5, f"takeover took {took:.2f}s, lease is 1.0s"
    assert cache.get("missing") is None
    client.close()


def _failing_holder(url: str) -> None:
    cache = rcache.Cache(url, prefix="fail")
    r = redis.Redis.from_url(url)

    @cache.cached(ttl=60, lease_ttl=30.0, name="g")
    def g() -> str:
        r.set("holder-started", 1)
        wait_until(lambda: r.get("go"), timeout=30)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        g()


def test_failed_computation_gives_up_the_lease_promptly(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    client = server.client()
    holder = CTX.Process(target=_failing_holder, args=(server.url,))
    holder.start()
    wait_until(
        lambda: client.get("holder-started"), timeout=20, message="holder to start"
    )
    cache = rcache.Cache(server.url, prefix="fail")

    @cache.cached(ttl=60, lease_ttl=30.0, name="g")
    def g() -> str:
        return "waiter"

    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append((g(), time.monotonic())))
    t.start()
    wait_until(lambda: client.exists("fail:c:g:[]:lease"), timeout=5, message="lease")
    wait_until(
        lambda: blocked_on_blmove(client), timeout=10, message="a blocked waiter"
    )
    client.set("go", 1)
    released = time.monotonic()
    t.join(20)
    holder.join(10)
    assert holder.exitcode == 0
    assert result and result[0][0] == "waiter"
    assert result[0][1] - released < 5.0  # promptly: not after the 30 s lease
    client.close()


def test_wait_budget_then_compute_or_raise(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="wb")
    redis_client.set("wb:c:f:[]:lease", "someone-else", px=20_000)

    @cache.cached(ttl=60, wait=0.3, name="f")
    def f() -> str:
        return "computed myself"

    start = time.monotonic()
    assert f() == "computed myself"
    assert time.monotonic() - start < 5

    @cache.cached(ttl=60, wait=0.3, on_wait_timeout="raise", name="f")
    def f2() -> str:
        return "never"

    redis_client.delete("wb:c:f:[]")
    with pytest.raises(rcache.LockNotAcquiredError):
        f2()


def _async_worker(url: str, callers: int, barrier: Any, out: Any) -> None:
    async def main() -> list[Any]:
        cache = rcache.Cache(url, prefix="ast")
        counter = redis.Redis.from_url(url)

        @cache.cached(ttl=60, name="aslow")
        async def aslow(x: int) -> int:
            counter.incr("runs")
            await asyncio.sleep(0.2)
            return x * 2

        barrier.wait()
        res = await asyncio.gather(*(aslow(21) for _ in range(callers)))
        await cache.aclose()
        return list(res)

    out.put(asyncio.run(main()))


def test_async_cold_key_runs_once_across_processes(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    client = server.client()
    procs, callers = 3, 50
    barrier = CTX.Barrier(procs)
    out = CTX.Queue()
    workers = [
        CTX.Process(target=_async_worker, args=(server.url, callers, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    assert int(client.get("runs") or 0) == 1
    assert all(r == [42] * callers for r in results)
    client.close()
