"""Worker process for the transaction concurrency tests (run as a script).

``python txworkers.py MODE URL KEY COUNT ROLE HOLDERS`` waits for a start token on the
list ``KEY:go``, performs COUNT decrements of the stock held at KEY, and prints its
TransactionStats as one JSON line.

A conflict is made certain, not likely (on a loaded 2-core box the scheduler can run the
workers one after the other): a ``hold`` worker, on the first run of its function, keeps
its WATCH open until the watched key has changed; a ``go`` worker starts decrementing
only once all HOLDERS hold their WATCH. So every holder's first EXEC meets a changed key.

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
HOLD_DEADLINE = 30.0


class _Hold:
    """The first run of a holder's function waits, inside its WATCH, for another
    worker's write; the ``go`` workers wait for every holder to be holding."""

    def __init__(self, url: str, key: str, raw_key: str, role: str, holders: int):
        self.client = redis.Redis.from_url(url)
        self.key, self.raw_key, self.role, self.holders = key, raw_key, role, holders
        self.pending = role == "hold"

    def _poll(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + HOLD_DEADLINE
        while not done():
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not happen within {HOLD_DEADLINE} s")
            time.sleep(0.001)

    def inside_watch(self) -> None:
        if not self.pending:
            return
        self.pending = False
        # Nobody writes before every holder got here: this is the value WATCH saw.
        seen = self.client.get(self.raw_key)
        self.client.rpush(f"{self.key}:held", 1)
        self._poll(lambda: self.client.get(self.raw_key) != seen, "another write")

    def before_start(self) -> None:
        if self.role == "go":
            held = f"{self.key}:held"
            self._poll(lambda: self.client.llen(held) >= self.holders, "the holds")


class OutOfStockError(Exception):
    pass


def _take_one(key: str, hold: _Hold) -> Any:
    def take_one(pipe: Any) -> None:
        stock = int(pipe.get(key) or 0)
        if stock <= 0:
            raise OutOfStockError(key)
        hold.inside_watch()
        time.sleep(THINK)
        pipe.multi()
        pipe.set(key, stock - 1)

    return take_one


def _atake_one(key: str, hold: _Hold) -> Any:
    async def take_one(pipe: Any) -> None:
        stock = int(await pipe.get(key) or 0)
        if stock <= 0:
            raise OutOfStockError(key)
        hold.inside_watch()  # blocks this worker's loop: nothing else runs on it
        await asyncio.sleep(THINK)
        pipe.multi()
        pipe.set(key, stock - 1)

    return take_one


def _decrementer(hold: _Hold) -> Any:
    def decrement(value: Any) -> Any:
        if value is None or value["stock"] <= 0:
            raise OutOfStockError()
        hold.inside_watch()
        time.sleep(THINK)
        return {**value, "stock": value["stock"] - 1, "by": os.getpid()}

    return decrement


def _wait_for_start(url: str, key: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=120)
    try:
        if client.blpop([f"{key}:go"], timeout=60) is None:
            raise SystemExit("no start signal within 60 s")
    finally:
        client.close()


def run(
    mode: str, url: str, key: str, count: int, role: str, holders: int
) -> TransactionStats:
    cache = rcache.Cache(url, prefix="test")
    stats = TransactionStats()
    raw_key = key if mode in ("tx", "atx") else f"test:k:{key}"
    hold = _Hold(url, key, raw_key, role, holders)
    _decrement = _decrementer(hold)
    _wait_for_start(url, key)
    hold.before_start()
    if mode == "tx":
        fn = _take_one(key, hold)
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
            afn = _atake_one(key, hold)
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
    hold.client.close()
    return stats


def main(argv: list[str]) -> None:
    mode, url, key, count = argv[1], argv[2], argv[3], int(argv[4])
    role, holders = argv[5], int(argv[6])
    stats = run(mode, url, key, count, role, holders)
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    fields.pop("_lock", None)
    out = {"mode": mode, "role": role, "pid": os.getpid(), **fields}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv)
