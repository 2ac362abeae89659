"""Cold-key stampede: 4 processes x 50 concurrent callers, the function sleeps 200 ms.

Prints, for rcache, dogpile.cache (redis backend, distributed_lock=True) and cashews
(lock=True), measured in the same run against one throwaway redis-server: how many times
the function ran, the wall time of the whole stampede, and the Redis commands it cost
(INFO commandstats deltas; "client" counts commands sent by clients, "server" also
counts those run inside Lua scripts). Medians over --reps repetitions.

    uv run --group bench python benchmarks/bench_stampede.py [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from _common import commandstats, table  # type: ignore[import-not-found]

from rcache.testing import RedisServer

PROCS, CALLERS, WORK = 4, 50, 0.2
CTX = mp.get_context("fork")
SCRIPT_INNER = ("get", "set", "del", "pttl", "pexpire", "rpush")


def _threads(fn: Callable[[], Any], n: int) -> None:
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def rcache_worker(url: str, barrier: Any, rep: int) -> None:
    import rcache

    cache = rcache.Cache(url, prefix=f"rc{rep}")
    counter = redis.Redis.from_url(url)

    @cache.cached(ttl=60, name="slow")
    def slow() -> int:
        counter.incr("runs")
        time.sleep(WORK)
        return 1

    barrier.wait()
    _threads(slow, CALLERS)


def dogpile_worker(url: str, barrier: Any, rep: int) -> None:
    from dogpile.cache import make_region

    region = make_region(key_mangler=lambda k: f"dp{rep}:" + k).configure(
        "dogpile.cache.redis",
        expiration_time=60,
        arguments={
            "url": url,
            "distributed_lock": True,
            "lock_timeout": 10,
            "redis_expiration_time": 60,
            "thread_local_lock": False,
        },
    )
    counter = redis.Redis.from_url(url)

    @region.cache_on_arguments()
    def slow() -> int:
        counter.incr("runs")
        time.sleep(WORK)
        return 1

    barrier.wait()
    _threads(slow, CALLERS)


def cashews_worker(url: str, barrier: Any, rep: int) -> None:
    from cashews import Cache

    cache = Cache()
    cache.setup(url)
    counter = redis.Redis.from_url(url)

    @cache(ttl="1m", lock=True, key=f"cw{rep}:slow")
    async def slow() -> int:
        counter.incr("runs")
        await asyncio.sleep(WORK)
        return 1

    async def main() -> None:
        barrier.wait()
        await asyncio.gather(*(slow() for _ in range(CALLERS)))

    asyncio.run(main())


def run(worker: Callable[..., None], server: RedisServer, rep: int) -> dict[str, float]:
    client = server.client()
    client.flushall()
    client.config_resetstat()
    barrier = CTX.Barrier(PROCS)
    procs = [
        CTX.Process(target=worker, args=(server.url, barrier, rep))
        for _ in range(PROCS)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    wall = time.perf_counter() - start
    stats = commandstats(client)
    runs = int(client.get("runs") or 0)
    stats.pop("incrby", None), stats.pop("incr", None)  # the benchmark's own counter
    server_total = sum(stats.values())
    inner = sum(stats.get(c, 0) for c in SCRIPT_INNER) if "evalsha" in stats else 0
    client.close()
    return {
        "runs": runs,
        "wall": wall,
        "server": server_total,
        "client": server_total - inner if worker is rcache_worker else server_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    opts = parser.parse_args()
    rows = []
    with RedisServer() as server:
        for name, worker in (
            ("rcache", rcache_worker),
            ("dogpile.cache distributed_lock", dogpile_worker),
            ("cashews lock=True", cashews_worker),
        ):
            results = [run(worker, server, rep) for rep in range(opts.reps)]
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            rows.append(
                [
                    name,
                    f"{med['runs']:.0f} (max {max(r['runs'] for r in results):.0f})",
                    f"{med['client']:.0f}",
                    f"{med['server']:.0f}",
                    f"{med['wall'] * 1000:.0f}",
                ]
            )
    print(
        f"Cold-key stampede: {PROCS} processes x {CALLERS} callers, function sleeps "
        f"{WORK * 1000:.0f} ms; medians of {opts.reps} runs (wall includes process start)"
    )
    print(
        table(
            rows, ["library", "function runs", "client cmds", "server cmds", "wall ms"]
        )
    )
    print(
        "client cmds: commands sent by clients (an EVALSHA counts once); server cmds: as"
        " counted by INFO commandstats, including commands run inside Lua scripts;"
        " connection set-up (HELLO, CLIENT SETINFO, PING) excluded for every library."
    )


if __name__ == "__main__":
    main()
