"""Redis Cluster benchmarks: rcache on a 3-primary cluster beside one server, and beside
cashews (``cluster=True``) and dogpile.cache (``dogpile.cache.redis_cluster``).

Not a test. Starts a throwaway redis-server and a local cluster (3 primaries, no
replicas, ``rcache.testing``) and prints, for each, medians of one run:

1. warm hit (sync and async), per call: a raw GET + json.loads floor beside rcache
   (stampede protection and two tags on: value and stamps in one MGET), dogpile, cashews;
2. miss (a new argument per call: claim, compute, store);
   the last column counts the Redis errors each carried on from (cashews logs and
   swallows them; dogpile raises them);
3. tag invalidation: rcache deletes a tag's stamp (one DEL on one server; one DEL per
   slot group on a cluster: O(B), whatever the number of entries), cashews deletes the
   tagged keys (O(n)); dogpile has no tags;
4. ``cached_batch`` of 20 ids (a hit) beside dogpile's ``cache_multi_on_arguments``,
   whose cross-slot MGET raises on a cluster;
5. lock hand-off (a waiter already blocked when the holder releases; see
   bench_locks.py).

    uv run --group bench python benchmarks/bench_cluster.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis.cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_note, table
from bench_locks import handoff

import rcache
from rcache.testing import RedisCluster, RedisServer

PAYLOAD = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "n": 99.5}
RAISES = "raises"


class Swallowed(logging.Handler):
    """Counts the Redis errors cashews logs and carries on from (its SafeRedis)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1

    def take(self) -> str:
        n, self.count = self.count, 0
        return str(n)


SWALLOWED = Swallowed()


def med(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.0f}"


def per_call(fn: Callable[[], Any], calls: int) -> list[float]:
    for _ in range(50):  # warm: connections, scripts, Redis's clock
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def aper_call(fn: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    for _ in range(50):
        await fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def first_node(cluster: RedisCluster) -> tuple[str, int]:
    node = cluster.primaries()[0]
    return "127.0.0.1", node.port


# -- subjects -----------------------------------------------------------------------


def rcache_fns(url: str, prefix: str) -> tuple[Any, Any, Any]:
    """(cache, hit function, miss function): stampede protection and tags on."""
    cache = rcache.Cache(url, prefix=prefix, ttl=600)

    @cache.cached(name="hit", tags=["users", "user:{x}"])
    def hit(x: int) -> dict[str, Any]:
        return PAYLOAD

    @cache.cached(name="miss", tags=["users", "user:{x}"])
    def miss(x: int) -> dict[str, Any]:
        return PAYLOAD

    return cache, hit, miss


def errors(cache: rcache.Cache) -> str:
    """How many Redis errors an rcache Cache counted (and bypassed)."""
    counts = cache.metrics.counts  # type: ignore[attr-defined]
    return str(sum(n for event, n in counts.items() if event[0] == "cache_errors"))


def dogpile_region(url: str, cluster: RedisCluster | None, prefix: str) -> Any:
    from dogpile.cache import make_region

    if cluster is None:
        backend, arguments = "dogpile.cache.redis", {"url": url}
    else:
        host, port = first_node(cluster)
        backend = "dogpile.cache.redis_cluster"
        arguments = {"startup_nodes": [redis.cluster.ClusterNode(host, port)]}
    region = make_region(key_mangler=lambda k: prefix + k)
    return region.configure(backend, expiration_time=600, arguments=arguments)


def cashews_cache(url: str, cluster: RedisCluster | None) -> Any:
    from cashews import Cache as CashewsCache

    cw = CashewsCache()
    if cluster is None:
        cw.setup(url)
    else:
        host, port = first_node(cluster)
        cw.setup(f"redis://{host}:{port}?cluster=true")
    return cw


# -- 1 and 2: hit and miss ----------------------------------------------------------------


def sync_rows(url: str, cluster: RedisCluster | None, calls: int) -> list[list[str]]:
    where = "cluster" if cluster else "one server"
    if cluster is None:
        raw: Any = redis.Redis.from_url(url)
    else:
        raw = cluster.client()
    raw.set("raw:user", json.dumps(PAYLOAD))
    rows = [
        [
            where,
            "redis-py GET + json.loads (floor)",
            med(per_call(lambda: json.loads(raw.get("raw:user")), calls)),
            "",
            "",
        ]
    ]
    cache, hit, miss = rcache_fns(url, "b")
    counter = iter(range(10**9))
    rows.append(
        [
            where,
            "rcache @cached (stampede + 2 tags)",
            med(per_call(lambda: hit(42), calls)),
            med(per_call(lambda: miss(next(counter)), calls // 4)),
            errors(cache),
        ]
    )
    region = dogpile_region(url, cluster, "dp:")

    @region.cache_on_arguments()
    def dp(x: int) -> dict[str, Any]:
        return PAYLOAD

    rows.append(
        [
            where,
            "dogpile cache_on_arguments",
            med(per_call(lambda: dp(42), calls)),
            med(per_call(lambda: dp(next(counter)), calls // 4)),
            "raises",
        ]
    )
    cache.close()
    raw.close()
    return rows


def async_rows(url: str, cluster: RedisCluster | None, calls: int) -> list[list[str]]:
    where = "cluster" if cluster else "one server"

    async def run() -> list[list[str]]:
        cache = rcache.Cache(url, prefix="ab", ttl=600)

        @cache.cached(name="ahit", tags=["users", "user:{x}"])
        async def hit(x: int) -> dict[str, Any]:
            return PAYLOAD

        @cache.cached(name="amiss", tags=["users", "user:{x}"])
        async def miss(x: int) -> dict[str, Any]:
            return PAYLOAD

        counter = iter(range(10**9))
        rows = [
            [
                where,
                "rcache @cached async (stampede + 2 tags)",
                med(await aper_call(lambda: hit(42), calls)),
                med(await aper_call(lambda: miss(next(counter)), calls // 4)),
                errors(cache),
            ]
        ]
        cw = cashews_cache(url, cluster)

        @cw(ttl="10m", key="cw:{x}")
        async def cwf(x: int) -> dict[str, Any]:
            return PAYLOAD

        @cw(ttl="10m", key="cwl:{x}", lock=True)
        async def cwl(x: int) -> dict[str, Any]:
            return PAYLOAD

        rows.append(
            [
                where,
                "cashews @cache",
                med(await aper_call(lambda: cwf(42), calls)),
                med(await aper_call(lambda: cwf(next(counter)), calls // 4)),
                SWALLOWED.take(),
            ]
        )
        rows.append(
            [
                where,
                "cashews @cache lock=True",
                med(await aper_call(lambda: cwl(42), calls)),
                med(await aper_call(lambda: cwl(next(counter)), calls // 4)),
                SWALLOWED.take(),
            ]
        )
        await cw.close()
        await cache.aclose()
        return rows

    return asyncio.run(run())


# -- 3. tag invalidation ------------------------------------------------------------------


def invalidation_rows(
    url: str, cluster: RedisCluster | None, entries: int, rounds: int
) -> list[list[str]]:
    rows = []
    where = "cluster" if cluster else "one server"
    for groups in (16, 64, 256) if cluster else (None,):
        cache = rcache.Cache(url, prefix=f"inv{groups}", ttl=600, slot_groups=groups)

        @cache.cached(name="tagged", tags=["t"])
        def f(x: int) -> int:
            return x

        for x in range(entries):
            f(x)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            cache.invalidate_tags("t")
            times.append(time.perf_counter() - t)
        label = "rcache invalidate_tags" + (f", slot_groups={groups}" if groups else "")
        rows.append(
            [where, label, f"{entries:,}", f"{statistics.median(times) * 1e3:.2f}"]
        )
        cache.close()

    async def cashews_tags() -> float:
        cw = cashews_cache(url, cluster)
        cw.register_tag("ct", "cwt:{x}")

        @cw(ttl="10m", key="cwt:{x}", tags=["ct"])
        async def g(x: int) -> int:
            return x

        times = []
        for _ in range(max(1, rounds // 10)):
            for start in range(0, entries, 250):
                await asyncio.gather(*(g(x) for x in range(start, start + 250)))
            t = time.perf_counter()
            await cw.delete_tags("ct")
            times.append(time.perf_counter() - t)
        await cw.close()
        return statistics.median(times)

    took = asyncio.run(cashews_tags())
    rows.append([where, "cashews delete_tags", f"{entries:,}", f"{took * 1e3:.2f}"])
    rows.append([where, "dogpile.cache", f"{entries:,}", "no tags"])
    return rows


# -- 4. batches ---------------------------------------------------------------------------


def batch_rows(url: str, cluster: RedisCluster | None, calls: int) -> list[list[str]]:
    where = "cluster" if cluster else "one server"
    ids = list(range(20))
    cache = rcache.Cache(url, prefix="bb", ttl=600)

    @cache.cached_batch(name="users")
    def users(ids: list[int]) -> dict[int, Any]:
        return dict.fromkeys(ids, PAYLOAD)

    rows = [
        [
            where,
            "rcache @cached_batch, 20 ids",
            med(per_call(lambda: users(ids), calls)),
        ]
    ]
    region = dogpile_region(url, cluster, "dpm:")

    @region.cache_multi_on_arguments()
    def dpm(*ids: int) -> list[Any]:
        return [PAYLOAD for _ in ids]

    try:
        took = med(per_call(lambda: dpm(*ids), calls))
    except redis.exceptions.RedisClusterException as exc:
        took = f"{RAISES}: {exc}"
    rows.append([where, "dogpile cache_multi_on_arguments, 20 ids", took])
    cache.close()
    return rows


# -- 5. lock hand-off ---------------------------------------------------------------------


def handoff_row(url: str, where: str, rounds: int) -> list[str]:
    values = sorted(handoff(url, "rcache (acquire/release)", rounds))
    p50 = values[len(values) // 2] * 1e3
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3
    return [where, "rcache lock hand-off", f"{p50:.2f}", f"{p99:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    versions = ", ".join(
        f"{d} {md.version(d)}" for d in ("redis", "dogpile.cache", "cashews")
    )
    out: dict[str, Any] = {}
    cashews_log = logging.getLogger("cashews")
    cashews_log.addHandler(SWALLOWED)
    cashews_log.propagate = False  # counted, not printed
    with RedisServer() as server, RedisCluster(replicas=0) as cluster:
        version = server.client().info("server")["redis_version"]
        print(
            f"redis-server {version} on loopback: one server, and a cluster of 3 "
            f"primaries (no replicas); Python {sys.version.split()[0]}; {versions}; "
            f"{os.cpu_count()} CPUs. Start: {load_note()}\n"
        )
        targets: list[tuple[str, RedisCluster | None]] = [
            (server.url, None),
            (cluster.url, cluster),
        ]
        rows = []
        for url, cl in targets:
            rows += sync_rows(url, cl, args.calls)
            rows += async_rows(url, cl, args.calls)
        rows.sort(key=lambda r: (r[1], r[0] != "one server"))
        print(f"1-2. Warm hit and miss (median µs per call; {args.calls:,} hits)")
        print(
            table(rows, ["where", "subject", "hit µs", "miss µs", "errors swallowed"])
        )
        out["hit_miss"] = rows
        print()
        rows = []
        for url, cl in targets:
            rows += invalidation_rows(url, cl, args.entries, args.rounds)
        print("3. Tag invalidation (median ms per call)")
        print(table(rows, ["where", "subject", "tagged entries", "ms"]))
        out["invalidation"] = rows
        print()
        rows = []
        for url, cl in targets:
            rows += batch_rows(url, cl, args.calls // 4)
        print("4. Batches: 20 ids, all present (median µs per call)")
        print(table(rows, ["where", "subject", "µs"]))
        out["batches"] = rows
        print()
        rows = [
            handoff_row(server.url, "one server", args.rounds),
            handoff_row(cluster.url, "cluster", args.rounds),
        ]
        print(f"5. Lock hand-off ({args.rounds} rounds)")
        print(table(rows, ["where", "subject", "p50 ms", "p99 ms"]))
        out["handoff"] = rows
        print(f"\nEnd: {load_note()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
