"""Worker process for the transaction concurrency tests (run as a script).

``python txworkers.py MODE URL KEY COUNT`` waits for a start token on the list
``KEY:go`` (so that all workers start together and contend), performs COUNT
decrements of the stock held at KEY, and prints its TransactionStats as one JSON line.

MODE is ``tx``/``atx`` (a plain integer counter through ``cache.transaction`` /
``cache.atransaction``) or ``update``/``aupdate`` (a JSON value ``{"stock": n, ...}``
through ``cache.update`` / ``cache.aupdate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any

import redis

import rcache
from rcache._transaction import TransactionStats

RETRIES = 10_000  # the tests check the count, not the budget: never give up here
MAX_TIME = 60.0
# Work between the read and the write (a real function computes something there). It
# widens the WATCH window so that conflicts happen on every run, even on a 2-core box
# where the scheduler would otherwise often run one WATCH..EXEC uninterrupted.
THINK = 0.0003


class OutOfStockError(Exception):
    pass


def _take_one(key: str) -> Any:
    def take_one(pipe: Any) -> None:
        stock = int(pipe.get(key) or 0)
        if stock <= 0:
            raise OutOfStockError(key)
        time.sleep(THINK)
        pipe.multi()
        pipe.set(key, stock - 1)

    return take_one


def _atake_one(key: str) -> Any:
    async def take_one(pipe: Any) -> None:
        stock = int(await pipe.get(key) or 0)
        if stock <= 0:
            raise OutOfStockError(key)
        await asyncio.sleep(THINK)
        pipe.multi()
        pipe.set(key, stock - 1)

    return take_one


def _decrement(value: Any) -> Any:
    if value is None or value["stock"] <= 0:
        raise OutOfStockError()
    time.sleep(THINK)
    return {**value, "stock": value["stock"] - 1, "by": os.getpid()}


def _wait_for_start(url: str, key: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=120)
    try:
        if client.blpop([f"{key}:go"], timeout=60) is None:
            raise SystemExit("no start signal within 60 s")
    finally:
        client.close()


def run(mode: str, url: str, key: str, count: int) -> TransactionStats:
    cache = rcache.Cache(url, prefix="test")
    stats = TransactionStats()
    _wait_for_start(url, key)
    if mode == "tx":
        fn = _take_one(key)
        for _ in range(count):
            cache.transaction(
                fn, watch=[key], retries=RETRIES, max_time=MAX_TIME, stats=stats
            )
    elif mode == "update":
        for _ in range(count):
            cache.update(
                key,
                _decrement,
                ttl=600,
                retries=RETRIES,
                max_time=MAX_TIME,
                stats=stats,
            )
    elif mode in ("atx", "aupdate"):

        async def main() -> None:
            afn = _atake_one(key)
            for _ in range(count):
                if mode == "atx":
                    await cache.atransaction(
                        afn,
                        watch=[key],
                        retries=RETRIES,
                        max_time=MAX_TIME,
                        stats=stats,
                    )
                else:
                    await cache.aupdate(
                        key,
                        _decrement,
                        ttl=600,
                        retries=RETRIES,
                        max_time=MAX_TIME,
                        stats=stats,
                    )
            await cache.aclose()

        asyncio.run(main())
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    cache.close()
    return stats


def main(argv: list[str]) -> None:
    mode, url, key, count = argv[1], argv[2], argv[3], int(argv[4])
    stats = run(mode, url, key, count)
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    fields.pop("_lock", None)
    print(json.dumps({"mode": mode, "pid": os.getpid(), **fields}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
