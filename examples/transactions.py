"""cache.transaction: four processes buy from one stock counter without losing an update.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/transactions.py
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import redis
from _redis import redis_url

import rcache

PROCS, BUYS, STOCK_KEY = 4, 25, "example:stock:42"


class OutOfStockError(Exception):
    pass


def buyer(url: str, out: Any) -> None:
    cache = rcache.Cache(url, prefix="example")
    stats = rcache.TransactionStats()

    def take_one(pipe: Any) -> None:
        stock = int(pipe.get(STOCK_KEY) or 0)
        if stock <= 0:
            raise OutOfStockError
        pipe.multi()
        pipe.set(STOCK_KEY, stock - 1)

    for _ in range(BUYS):
        cache.transaction(take_one, watch=[STOCK_KEY], retries=100, stats=stats)
    out.put((stats.attempts, stats.conflicts))


def main(url: str) -> None:
    cache = rcache.Cache(url, prefix="example")
    db = redis.Redis.from_url(url)
    db.set(STOCK_KEY, 1000)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=buyer, args=(url, out)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    final = int(db.get(STOCK_KEY) or 0)
    print(f"{PROCS} processes x {BUYS} purchases from a stock of 1000 -> {final} left")
    print(
        f"attempts {sum(a for a, _ in results)}, WATCH conflicts retried "
        f"{sum(c for _, c in results)}: no update was lost"
    )
    assert final == 1000 - PROCS * BUYS

    cart = cache.update("cart:7", lambda cart: {**(cart or {}), "qty": 3}, ttl=600)
    print("cache.update('cart:7', ...) ->", cart, "| cache.get ->", cache.get("cart:7"))

    def refuse(pipe: Any) -> None:
        pipe.multi()
        pipe.set(STOCK_KEY, 0)
        raise OutOfStockError

    try:
        cache.transaction(refuse, watch=[STOCK_KEY])
    except OutOfStockError:
        print(
            "an exception in the function aborts the transaction: stock still",
            int(db.get(STOCK_KEY) or 0),
        )


if __name__ == "__main__":
    with redis_url(memory_ok=False) as url:
        main(url)
    print("transactions example finished")
