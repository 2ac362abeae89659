"""Every call of a decorated function is counted exactly once in ``cache_gets``.

Calls that share one computation used to be counted nowhere (8 threads on a cold key:
``hit 0, miss 1``); waiters of another process's computation were counted as misses
although they never ran the function. Now each call ends in exactly one result:
``hit``, ``miss``, ``stale`` or ``coalesced``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

import rcache
from rcache._serializers import decode_envelope
from rcache.testing import wait_until

CTX = mp.get_context("fork")
RESULTS = ("hit", "miss", "stale", "coalesced")


def counts(cache: rcache.Cache, name: str) -> dict[str, int]:
    metrics = cache.metrics
    assert isinstance(metrics, rcache.InMemoryMetrics)
    return {r: metrics.count("cache_gets", name, r) for r in RESULTS}


def blocked_on_blmove(client: redis.Redis) -> int:
    return sum(
        1
        for c in client.client_list()
        if c.get("cmd") == "blmove" and "b" in c.get("flags", "")
    )


def test_threads_sharing_one_computation_are_each_counted(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="cc")
    threads, runs = 8, []

    @cache.cached(ttl=60, name="cc.threads")
    def slow(x: int) -> int:
        runs.append(x)
        # hold the computation until every other caller has joined it
        wait_until(
            lambda: slow._spec.flights[slow.key_for(x)].followers == threads - 1,  # type: ignore[attr-defined]
            timeout=10,
            message="followers",
        )
        return x * 2

    results: list[int] = []
    workers = [
        threading.Thread(target=lambda: results.append(slow(21)))
        for _ in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    assert results == [42] * threads
    assert runs == [21]
    assert counts(cache, "cc.threads") == {
        "hit": 0,
        "miss": 1,
        "stale": 0,
        "coalesced": threads - 1,
    }
    # later calls are hits, one count each
    for _ in range(3):
        assert slow(21) == 42
    assert counts(cache, "cc.threads")["hit"] == 3
    cache.close()


def test_threads_sharing_one_lookup_count_hits(redis_url: str) -> None:
    """Callers that share a concurrent caller's *hit* are hits, not coalesced."""
    cache = rcache.Cache(redis_url, prefix="cc")

    @cache.cached(ttl=60, name="cc.hot")
    def hot() -> int:
        return 1

    hot()  # warm: one miss
    barrier = threading.Barrier(16)

    def call() -> None:
        barrier.wait()
        for _ in range(20):
            assert hot() == 1

    workers = [threading.Thread(target=call) for _ in range(16)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    assert counts(cache, "cc.hot") == {
        "hit": 16 * 20,
        "miss": 1,
        "stale": 0,
        "coalesced": 0,
    }
    cache.close()


async def test_tasks_sharing_one_computation_are_each_counted(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="cc")
    tasks, runs = 12, []
    release = asyncio.Event()

    @cache.cached(ttl=60, name="cc.tasks")
    async def slow(x: int) -> int:
        runs.append(x)
        await release.wait()
        return x * 2

    calls = [asyncio.create_task(slow(5)) for _ in range(tasks)]
    # the leader is computing; every other task is waiting on its future
    await asyncio.wait_for(_until(lambda: _followers(slow, 5) == tasks - 1), 10)
    release.set()
    assert await asyncio.gather(*calls) == [10] * tasks
    assert runs == [5]
    assert counts(cache, "cc.tasks") == {
        "hit": 0,
        "miss": 1,
        "stale": 0,
        "coalesced": tasks - 1,
    }
    # a failing shared computation: each caller is counted once, all see the error
    fail = asyncio.Event()

    @cache.cached(ttl=60, name="cc.fail")
    async def boom() -> int:
        await fail.wait()
        raise ValueError("boom")

    failing = [asyncio.create_task(boom()) for _ in range(4)]
    await asyncio.wait_for(_until(lambda: _followers(boom) == 3), 10)
    fail.set()
    outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert sum(counts(cache, "cc.fail").values()) == 4
    await cache.aclose()


def _followers(fn: Any, *args: Any) -> int:
    """Callers waiting on the running computation of ``fn(*args)`` in this loop."""
    flights = fn._spec.aflights.get(asyncio.get_running_loop(), {})
    flight = flights.get(fn.key_for(*args))
    return 0 if flight is None else int(flight.followers)


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the caller bounds it with wait_for), yielding to the tasks."""
    while not predicate():  # noqa: ASYNC110 -- the condition has no event to await
        await asyncio.sleep(0.001)


def _process(url: str, threads: int, procs: int, barrier: Any, out: Any) -> None:
    cache = rcache.Cache(url, prefix="ccp")
    client = redis.Redis.from_url(url)

    @cache.cached(ttl=60, name="cc.procs")
    def slow(x: int) -> int:
        client.incr("runs")
        # the one computing process holds on until every other process waits for it
        wait_until(
            lambda: blocked_on_blmove(client) >= procs - 1,
            timeout=20,
            message="the other processes to wait",
        )
        return x + 1

    results: list[int] = []
    start = threading.Barrier(threads)

    def call() -> None:
        start.wait()
        results.append(slow(1))

    barrier.wait()
    workers = [threading.Thread(target=call) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    out.put((results, counts(cache, "cc.procs")))
    cache.close()


def test_processes_sharing_one_computation_are_each_counted(
    redis_url: str, redis_client: redis.Redis
) -> None:
    procs, threads = 4, 5
    barrier, out = CTX.Barrier(procs), CTX.Queue()
    workers = [
        CTX.Process(target=_process, args=(redis_url, threads, procs, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    reports = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert int(redis_client.get("runs") or 0) == 1
    assert all(results == [2] * threads for results, _ in reports)
    total = {r: sum(c[r] for _, c in reports) for r in RESULTS}
    assert sum(total.values()) == procs * threads, total
    assert total["miss"] == 1, total
    assert total["stale"] == 0, total
    # at least the other processes' waiters and the computing process's followers
    # shared the one computation (late followers may find the value: hits)
    assert total["coalesced"] >= procs - 1, total


def test_stale_if_error_fallback_is_counted_once(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="cc")
    fail = {"on": False}

    @cache.cached(ttl=0.2, stale_if_error=30, name="cc.sie")
    def f() -> str:
        if fail["on"]:
            raise ConnectionError("database down")
        return "good"

    assert f() == "good"  # miss
    fail["on"] = True
    raw = cache._sync.client.get(f.key_for())
    assert isinstance(raw, bytes)
    fresh_until = decode_envelope(cache.serializer, raw).fresh_until
    wait_until(lambda: time.time() > fresh_until, timeout=10, message="staleness")
    assert f() == "good"  # the computation failed: the old value, counted stale once
    assert counts(cache, "cc.sie") == {"hit": 0, "miss": 1, "stale": 1, "coalesced": 0}
    cache.close()
