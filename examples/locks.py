"""Distributed locks: fencing tokens, contention across processes, @cache.locked.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/locks.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import redis
from _redis import redis_url

import rcache


def worker(url: str, rounds: int, out: Any) -> None:
    cache = rcache.Cache(url, prefix="example")
    db = redis.Redis.from_url(url)
    fences = []
    for _ in range(rounds):
        with cache.lock("counter", ttl=5, timeout=30) as lock:
            # an unprotected read-modify-write: safe only because we hold the lock
            value = int(db.get("example:counter") or 0)
            db.set("example:counter", value + 1)
            fences.append(lock.fence)
    out.put(fences)


def main(url: str) -> None:
    cache = rcache.Cache(url, prefix="example")
    db = redis.Redis.from_url(url)
    db.set("example:counter", 0)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, 50, out)) for _ in range(4)]
    for p in procs:
        p.start()
    fences = [f for _ in procs for f in out.get(timeout=120)]
    for p in procs:
        p.join()
    print(
        f"4 processes x 50 locked increments -> counter = {int(db.get('example:counter'))}"
    )
    print(f"fencing tokens: {len(set(fences))} distinct, each holder got a new one")

    lock = cache.lock("report", ttl=10)
    print("lock.acquire(timeout=0) ->", lock.acquire(timeout=0))
    print(
        "another handle, acquire(timeout=0) ->", cache.lock("report").acquire(timeout=0)
    )
    lock.release()

    @cache.locked("invoice:{invoice_id}", ttl=30, timeout=5)
    def pay(invoice_id: int) -> str:
        time.sleep(0.05)
        return f"paid {invoice_id}"

    print("@cache.locked ->", pay(7))

    async def async_part() -> None:
        async with cache.lock("async-report", ttl=10) as alock:
            print("async with cache.lock(...) -> fence", alock.fence)
        await cache.aclose()

    asyncio.run(async_part())


if __name__ == "__main__":
    with redis_url(memory_ok=False) as url:
        main(url)
    print("locks example finished")
