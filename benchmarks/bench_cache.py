"""Cache benchmarks: warm hit, miss, outage, tag invalidation, value size, processes.

Every peer runs in the same process and run, against the same throwaway redis-server
(started here). Each figure is the median over --reps repetitions with its spread;
the repetitions are interleaved (every subject runs once per round, in a rotating
order), so that a change in the machine's load hits all subjects alike. Every row
states Redis round trips (commands sent) per operation, from INFO commandstats deltas.

The issue 13 targets are printed after the tables, each beside its floor, its ratio and
PASS/FAIL, with the peers' ratios from the same run:

* sync warm hit <= 1.10x the floor (redis-py GET + json.loads), every option on <= 1.15x;
* async warm hit <= 1.15x the async floor (redis.asyncio GET + json.loads);
* a call while the circuit breaker is open <= 2.5 us.

    uv run --group bench python benchmarks/bench_cache.py [--reps 5] [--calls 3000]
    uv run --group bench python benchmarks/bench_cache.py --quick   # targets only, ~1 min

Prints markdown tables; ``--json FILE`` also writes the raw figures for run_all.py.
The lock target is printed by bench_locks.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

sys.path.insert(0, str(Path(__file__).parent))
from _common import RoundTrips, commandstats, load_note, table

import rcache
from rcache.testing import RedisServer

PAYLOAD = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "active": True,
    "score": 99.5,
}
CTX = mp.get_context("fork")

# issue 13: (what, subject, floor, limit); subjects and floors are the row names below
FLOOR = "redis-py GET + json.loads (floor)"
AFLOOR = "redis.asyncio GET + json.loads (floor)"
PLAIN = "rcache @cached"
FULL = "rcache @cached, stampede + tags + early + stale on"
APLAIN = "rcache @cached (async)"
AFULL = "rcache @cached (async), stampede + tags + early + stale on"
OPEN = "rcache @cached (breaker open, fails open)"
RATIO_TARGETS = [
    ("sync warm hit", "hits", PLAIN, 1.10),
    ("sync warm hit, every option on", "hits", FULL, 1.15),
    ("async warm hit", "ahits", APLAIN, 1.15),
    ("async warm hit, every option on", "ahits", AFULL, 1.15),
]
OPEN_LIMIT_US = 2.5


def time_sync(fn: Callable[[], Any], calls: int) -> tuple[float, float, float]:
    """(median us/call, p99 us, client CPU us/call)."""
    lat = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / calls
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6, cpu * 1e6


async def time_async(
    fn: Callable[[], Awaitable[Any]], calls: int
) -> tuple[float, float, float]:
    lat = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / calls
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6, cpu * 1e6


def cmds_per_call(client: redis.Redis, fn: Callable[[], Any], n: int = 200) -> float:
    client.config_resetstat()
    for _ in range(n):
        fn()
    return sum(commandstats(client).values()) / n


async def acmds_per_call(
    client: redis.Redis, fn: Callable[[], Awaitable[Any]], n: int = 200
) -> float:
    client.config_resetstat()
    for _ in range(n):
        await fn()
    return sum(commandstats(client).values()) / n


# -- subjects -------------------------------------------------------------------------


def sync_subjects(url: str) -> dict[str, Callable[[], Any]]:
    raw = redis.Redis.from_url(url)
    raw.set("raw:user", json.dumps(PAYLOAD))
    out: dict[str, Callable[[], Any]] = {
        "redis-py GET + json.loads (floor)": lambda: json.loads(raw.get("raw:user")),  # type: ignore[arg-type]
    }
    cache = rcache.Cache(url, prefix="bench")

    @cache.cached(ttl=600, name="rc_plain", stampede=False)
    def rc_plain(x: int) -> dict[str, Any]:
        return PAYLOAD

    @cache.cached(
        ttl=600, name="rc_full", tags=["users", "user:{x}"], early=True, stale=60
    )
    def rc_full(x: int) -> dict[str, Any]:
        return PAYLOAD

    out["rcache @cached"] = lambda: rc_plain(42)
    out["rcache @cached, stampede + tags + early + stale on"] = lambda: rc_full(42)

    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis", expiration_time=600, arguments={"url": url}
    )

    @region.cache_on_arguments()
    def dp(x: int) -> dict[str, Any]:
        return PAYLOAD

    out["dogpile.cache cache_on_arguments"] = lambda: dp(42)

    import flask
    from flask_caching import Cache as FlaskCache

    app = flask.Flask("bench")
    fc = FlaskCache(
        app,
        config={
            "CACHE_TYPE": "RedisCache",
            "CACHE_REDIS_URL": url,
            "CACHE_DEFAULT_TIMEOUT": 600,
        },
    )

    @fc.memoize(timeout=600)
    def fcm(x: int) -> dict[str, Any]:
        return PAYLOAD

    ctx = app.app_context()
    ctx.push()
    out["Flask-Caching memoize"] = lambda: fcm(42)
    for fn in out.values():
        fn()  # warm
    return out


def async_subjects(url: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    raw = redis.asyncio.Redis.from_url(url)

    async def floor() -> Any:
        return json.loads(await raw.get("raw:user"))  # type: ignore[arg-type]

    out: dict[str, Callable[[], Awaitable[Any]]] = {
        "redis.asyncio GET + json.loads (floor)": floor
    }
    cache = rcache.Cache(url, prefix="abench")

    @cache.cached(ttl=600, name="arc_plain", stampede=False)
    async def rc_plain(x: int) -> dict[str, Any]:
        return PAYLOAD

    @cache.cached(
        ttl=600, name="arc_full", tags=["users", "user:{x}"], early=True, stale=60
    )
    async def rc_full(x: int) -> dict[str, Any]:
        return PAYLOAD

    out["rcache @cached (async)"] = lambda: rc_plain(42)
    out["rcache @cached (async), stampede + tags + early + stale on"] = lambda: rc_full(
        42
    )

    from cashews import Cache as CashewsCache

    cw = CashewsCache()
    cw.setup(url)

    @cw(ttl="10m", key="cw:{x}")
    async def cwf(x: int) -> dict[str, Any]:
        return PAYLOAD

    @cw(ttl="10m", key="cwl:{x}", lock=True)
    async def cwl(x: int) -> dict[str, Any]:
        return PAYLOAD

    out["cashews @cache"] = lambda: cwf(42)
    out["cashews @cache lock=True"] = lambda: cwl(42)

    from aiocache import RedisCache, cached
    from aiocache.serializers import JsonSerializer

    @cached(
        ttl=600,
        cache=RedisCache,
        endpoint="127.0.0.1",
        port=int(url.rsplit(":", 1)[1].split("/")[0]),
        serializer=JsonSerializer(),
        key_builder=lambda f, *a, **k: f"ai:{a}",
    )
    async def ai(x: int) -> dict[str, Any]:
        return PAYLOAD

    out["aiocache @cached (JSON)"] = lambda: ai(42)
    return out


# -- sections ---------------------------------------------------------------------------


def _hit_rows(
    timed: list[tuple[str, list[tuple[float, float, float]], float]],
) -> list[list[str]]:
    """Table rows for (name, runs of (p50, p99, cpu), commands per hit); the first
    subject is the floor the others are compared with."""
    rows = []
    floor_p50 = statistics.median(r[0] for r in timed[0][1])
    floor_cpu = statistics.median(r[2] for r in timed[0][1])
    for name, runs, cmds in timed:
        p50 = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        rows.append(
            [
                name,
                f"{p50:.0f} ({min(r[0] for r in runs):.0f}-{max(r[0] for r in runs):.0f})",
                f"{statistics.median(r[1] for r in runs):.0f}",
                f"{cpu:.0f}",
                f"{cpu - floor_cpu:+.0f}",
                f"{p50 / floor_p50:.2f}x",
                f"{cmds:.2f}",
            ]
        )
    return rows


def _rotations(names: list[str], reps: int) -> list[list[str]]:
    """One order per round: each subject runs once per round and leads in turn."""
    return [names[i % len(names) :] + names[: i % len(names)] for i in range(reps)]


def bench_hits(url: str, reps: int, calls: int, client: redis.Redis) -> list[list[str]]:
    subjects = sync_subjects(url)
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in subjects}
    for order in _rotations(list(subjects), reps):
        for name in order:
            runs[name].append(time_sync(subjects[name], calls))
    return _hit_rows(
        [(n, runs[n], cmds_per_call(client, fn)) for n, fn in subjects.items()]
    )


def bench_ahits(
    url: str, reps: int, calls: int, client: redis.Redis
) -> list[list[str]]:
    async def main() -> list[list[str]]:
        subjects = async_subjects(url)
        for fn in subjects.values():
            await fn()
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in subjects}
        for order in _rotations(list(subjects), reps):
            for name in order:
                runs[name].append(await time_async(subjects[name], calls))
        return _hit_rows(
            [(n, runs[n], await acmds_per_call(client, f)) for n, f in subjects.items()]
        )

    return asyncio.run(main())


def _ratio(rows: list[list[str]], name: str) -> float:
    """The "p50 vs floor" figure of ``name`` in a hit table."""
    row = next(r for r in rows if r[0] == name)
    return float(row[5].rstrip("x"))


def _p50(rows: list[list[str]], name: str) -> float:
    row = next(r for r in rows if r[0] == name)
    return float(str(row[1]).split()[0])


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """The issue 13 targets, each with its floor, ratio, limit and PASS/FAIL, and the
    peers' ratios from the same tables."""
    rows = []
    for what, table_key, subject, limit in RATIO_TARGETS:
        if table_key not in results:
            continue
        hits = results[table_key]
        ratio = _ratio(hits, subject)
        peers = ", ".join(
            f"{r[0].split(' ', 1)[0]} {r[5]}"
            for r in hits[1:]
            if not r[0].startswith("rcache") and "lock=True" not in r[0]
        )
        rows.append(
            [
                what,
                f"{_p50(hits, subject):.0f} us",
                f"{_p50(hits, hits[0][0]):.0f} us",
                f"{ratio:.2f}x",
                f"<= {limit:.2f}x",
                "PASS" if ratio <= limit else "FAIL",
                peers,
            ]
        )
    if "outage" in results:
        row = next(r for r in results["outage"] if r[0] == OPEN)
        us = float(row[1])
        rows.append(
            [
                "breaker-open call",
                f"{us:.1f} us",
                "-",
                "-",
                f"<= {OPEN_LIMIT_US} us",
                "PASS" if us <= OPEN_LIMIT_US else "FAIL",
                ", ".join(
                    f"{r[0].split(',')[0]} {r[1]} us" for r in results["outage"][1:]
                ),
            ]
        )
    return rows


TARGET_HEADER = [
    "target",
    "rcache p50",
    "floor p50",
    "ratio",
    "limit",
    "",
    "peers (same run)",
]


def bench_miss(url: str, reps: int, client: redis.Redis) -> list[list[str]]:
    """A miss: read, compute (no-op), store. Keys differ every call."""
    cache = rcache.Cache(url, prefix="miss")
    counter = iter(range(10**9))

    @cache.cached(ttl=600, name="m")
    def m(x: int) -> dict[str, Any]:
        return PAYLOAD

    raw = redis.Redis.from_url(url)

    def floor() -> None:
        k = f"rawmiss:{next(counter)}"
        if raw.get(k) is None:
            raw.set(k, json.dumps(PAYLOAD), ex=600)

    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis", expiration_time=600, arguments={"url": url}
    )

    @region.cache_on_arguments()
    def dp(x: int) -> dict[str, Any]:
        return PAYLOAD

    subjects = {
        "redis-py GET + SET (floor)": floor,
        "rcache @cached (stampede on)": lambda: m(next(counter)),
        "dogpile.cache cache_on_arguments": lambda: dp(next(counter)),
    }
    rows = []
    for name, fn in subjects.items():
        runs = [time_sync(fn, 500) for _ in range(reps)]
        client.config_resetstat()
        with RoundTrips() as trips:
            for _ in range(100):
                fn()
        cmds = sum(commandstats(client).values()) / 100
        rtts = trips.count / 100
        rows.append(
            [
                name,
                f"{statistics.median(r[0] for r in runs):.0f}",
                f"{statistics.median(r[2] for r in runs):.0f}",
                f"{rtts:.2f}",
                f"{cmds:.2f}",
            ]
        )
    return rows


def bench_outage(reps: int) -> list[list[str]]:
    """Per-call cost with Redis down (connection refused), after the breaker opened."""
    rows = []
    server = RedisServer().start()
    url = server.url
    cache = rcache.Cache(url, prefix="out")

    @cache.cached(ttl=60, name="o")
    def o(x: int) -> int:
        return x

    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis", expiration_time=600, arguments={"url": url}
    )

    @region.cache_on_arguments()
    def dp(x: int) -> int:
        return x

    raw = redis.Redis.from_url(url)

    def raw_get() -> None:
        try:
            raw.get("k")
        except redis.RedisError:
            pass

    def dp_call() -> None:
        try:
            dp(1)
        except redis.RedisError:
            pass

    o(1), dp(1), raw_get()
    server.kill()
    for _ in range(5):
        o(1)  # opens the breaker
    for name, fn, n in (
        ("rcache @cached (breaker open, fails open)", lambda: o(1), 2000),
        ("redis-py GET, default client (raises)", raw_get, 50),
        ("dogpile.cache (raises)", dp_call, 50),
    ):
        runs = [time_sync(fn, n) for _ in range(reps)]
        rows.append(
            [
                name,
                f"{statistics.median(r[0] for r in runs):.1f}",
                f"{statistics.median(r[2] for r in runs):.1f}",
            ]
        )
    server.close()
    return rows


def bench_tags(url: str, client: redis.Redis, sizes: list[int]) -> list[list[str]]:
    rows = []
    cache = rcache.Cache(url, prefix="tags")
    for n in sizes:

        @cache.cached(ttl=600, name=f"t{n}", tags=[f"tag{n}"])
        def f(x: int) -> int:
            return x

        cl = redis.Redis.from_url(url)
        # fill through the decorator: real entries, pipelined in threads for speed
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(f, range(n), chunksize=256))
        client.config_resetstat()
        t = time.perf_counter()
        cache.invalidate_tags(f"tag{n}")
        took = (time.perf_counter() - t) * 1e3
        cmds = sum(commandstats(client).values())
        rows.append([f"rcache, {n:,} entries", f"{took:.2f}", str(cmds)])
        cl.close()

    async def cashews_tags(n: int) -> tuple[float, int]:
        from cashews import Cache as CashewsCache

        cw = CashewsCache()
        cw.setup(url)
        cw.register_tag(f"ctag{n}", f"cwt{n}:{{x}}")

        @cw(ttl="10m", key=f"cwt{n}:{{x}}", tags=[f"ctag{n}"])
        async def g(x: int) -> int:
            return x

        for start in range(0, n, 500):
            await asyncio.gather(*(g(x) for x in range(start, min(n, start + 500))))
        client.config_resetstat()
        t = time.perf_counter()
        await cw.delete_tags(f"ctag{n}")
        took = (time.perf_counter() - t) * 1e3
        return took, sum(commandstats(client).values())

    for n in sizes:
        took, cmds = asyncio.run(cashews_tags(n))
        rows.append([f"cashews delete_tags, {n:,} entries", f"{took:.2f}", str(cmds)])
    return rows


def _dogpile_region(url: str, prefix: str) -> Any:
    from dogpile.cache import make_region

    return make_region(key_mangler=lambda k: prefix + k).configure(
        "dogpile.cache.redis", expiration_time=600, arguments={"url": url}
    )


def bench_sizes(url: str, reps: int) -> list[list[str]]:
    rows = []
    raw = redis.Redis.from_url(url)
    cache = rcache.Cache(url, prefix="size")
    region = _dogpile_region(url, "dpsize:")

    def subjects(size: int) -> list[Callable[[], Any]]:
        value = {"blob": "x" * size}
        raw.set(f"rawsize:{size}", json.dumps(value))

        @cache.cached(ttl=600, name=f"s{size}")
        def s(x: int) -> dict[str, str]:
            return value

        @region.cache_on_arguments(namespace=str(size))
        def d(x: int) -> dict[str, str]:
            return value

        s(size), d(size)
        return [
            lambda: json.loads(raw.get(f"rawsize:{size}")),  # type: ignore[arg-type]
            lambda: s(size),
            lambda: d(size),
        ]

    for size in (100, 10_000, 1_000_000):
        calls = 2000 if size < 1_000_000 else 100
        f50, r50, d50 = (
            statistics.median(time_sync(fn, calls)[0] for _ in range(reps))
            for fn in subjects(size)
        )
        rows.append(
            [
                f"{size:,} B",
                f"{f50:.0f}",
                f"{r50:.0f} ({r50 / f50:.2f}x)",
                f"{d50:.0f} ({d50 / f50:.2f}x)",
            ]
        )
    return rows


def _proc_hits(url: str, which: str, seconds: float, barrier: Any, out: Any) -> None:
    if which == "rcache":
        cache = rcache.Cache(url, prefix="procs")

        @cache.cached(ttl=600, name="p")
        def p(x: int) -> dict[str, Any]:
            return PAYLOAD

    else:
        region = _dogpile_region(url, "dpprocs:")

        @region.cache_on_arguments()
        def p(x: int) -> dict[str, Any]:
            return PAYLOAD

    p(1)
    barrier.wait()
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        p(1)
        n += 1
    out.put(n)


def bench_procs(url: str) -> list[list[str]]:
    rows = []
    for procs in (1, 2, 4, 8):
        row = [str(procs)]
        for which in ("rcache", "dogpile"):
            barrier, out = CTX.Barrier(procs), CTX.Queue()
            ps = [
                CTX.Process(target=_proc_hits, args=(url, which, 1.5, barrier, out))
                for _ in range(procs)
            ]
            for p in ps:
                p.start()
            total = sum(out.get(timeout=60) for _ in ps)
            for p in ps:
                p.join()
            row.append(f"{total / 1.5:,.0f}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="default 5 (quick: 5)")
    parser.add_argument(
        "--calls", type=int, default=None, help="default 3000 (quick: 1000)"
    )
    parser.add_argument("--tag-sizes", default="1,1000,100000")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only what the targets need: warm hits (sync, async) and the outage",
    )
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    opts.reps = opts.reps or 5
    opts.calls = opts.calls or (1000 if opts.quick else 3000)
    results: dict[str, Any] = {"load": [load_note()]}
    print(f"Start: {results['load'][0]}")
    with RedisServer() as server:
        client = server.client()
        hdr = [
            "subject",
            "p50 us (min-max of reps)",
            "p99 us",
            "client CPU us",
            "CPU vs floor",
            "p50 vs floor",
            "cmds/hit",
        ]
        results["hits"] = bench_hits(server.url, opts.reps, opts.calls, client)
        print(f"\n### Warm hit, sync ({opts.calls} hits x {opts.reps} reps, medians)\n")
        print(table(results["hits"], hdr))
        results["ahits"] = bench_ahits(server.url, opts.reps, opts.calls, client)
        print(
            f"\n### Warm hit, async ({opts.calls} hits x {opts.reps} reps, medians)\n"
        )
        print(table(results["ahits"], hdr))
        if opts.quick:
            results["outage"] = bench_outage(opts.reps)
            print("\n### Redis down (connection refused), per call\n")
            print(
                table(
                    results["outage"], ["subject", "p50 us/call", "client CPU us/call"]
                )
            )
            _print_targets(results)
            return
        results["miss"] = bench_miss(server.url, opts.reps, client)
        print("\n### Miss (500 misses x reps, function is a no-op)\n")
        print(
            table(
                results["miss"],
                [
                    "subject",
                    "p50 us",
                    "client CPU us",
                    "round trips",
                    "server cmds/miss",
                ],
            )
        )
        results["outage"] = bench_outage(opts.reps)
        print("\n### Redis down (connection refused), per call\n")
        print(
            table(results["outage"], ["subject", "p50 us/call", "client CPU us/call"])
        )
        sizes = [int(x) for x in opts.tag_sizes.split(",")]
        results["tags"] = bench_tags(server.url, client, sizes)
        print("\n### Invalidate one tag\n")
        print(table(results["tags"], ["subject", "ms", "Redis commands"]))
        results["sizes"] = bench_sizes(server.url, opts.reps)
        print("\n### Warm hit by value size (sync, p50 us)\n")
        print(
            table(
                results["sizes"],
                [
                    "value",
                    "floor GET+json.loads",
                    "rcache (vs floor)",
                    "dogpile (vs floor)",
                ],
            )
        )
        results["procs"] = bench_procs(server.url)
        print("\n### Warm hits by number of processes (1.5 s each, 2 cores)\n")
        print(
            table(
                results["procs"],
                [
                    "processes",
                    "rcache hits/s, all processes",
                    "dogpile hits/s, all processes",
                ],
            )
        )
    _print_targets(results)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))


def _print_targets(results: dict[str, Any]) -> None:
    results["targets"] = target_rows(results)
    results["load"].append(load_note())
    print("\n### Issue 13 targets (this run)\n")
    print(table(results["targets"], TARGET_HEADER))
    print(f"\nStart: {results['load'][0]}; end: {results['load'][1]}")


if __name__ == "__main__":
    main()
