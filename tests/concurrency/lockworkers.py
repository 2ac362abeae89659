"""Worker functions for the multi-process lock tests (importable by spawned children).

Each worker builds its own ``Cache`` in the child (clients are per process) and reports
through a multiprocessing queue or a JSON file that the test reads back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import redis

import rcache
from rcache import _lock
from rcache._exceptions import LockError


def _cache(url: str) -> rcache.Cache:
    return rcache.Cache(url, prefix="t")


def counter_worker(
    url: str, name: str, n: int, counter: str, log: str, ready: Any, go: Any, fair: bool
) -> None:
    """``n`` times: under the lock, read-modify-write a plain file (no fencing)."""
    cache = _cache(url)
    lock = (_lock.FairLock if fair else _lock.Lock)(cache, name, ttl=10, timeout=60)
    path = Path(counter)
    records = []
    ready.put(os.getpid())
    go.wait(60)
    for _ in range(n):
        with lock as held:
            start = time.monotonic()
            value = int(path.read_text() or "0")
            time.sleep(0)  # let another process run here if the lock were broken
            path.write_text(str(value + 1))
            records.append([value, held.fence, start, time.monotonic()])
    Path(log).write_text(json.dumps(records))


def hold_worker(url: str, name: str, ttl: float, kind: str, queue: Any) -> None:
    """Acquire (lock, read lease or semaphore permit), report, then hold until killed."""
    cache = _cache(url)
    obj: Any
    if kind == "lock":
        obj = _lock.Lock(cache, name, ttl=ttl, timeout=10)
    elif kind == "read":
        obj = _lock.RWLock(cache, name, ttl=ttl, timeout=10).read()
    else:
        obj = _lock.Semaphore(cache, name, limit=int(kind.split(":")[1]), ttl=ttl)
    with obj:
        queue.put(obj.lease.token)
        while True:
            time.sleep(0.05)


def stopped_holder(
    url: str, name: str, ttl: float, queue: Any, go: str, out: str
) -> None:
    """Hold a lock; after being SIGSTOPped past its TTL and resumed, report what it sees."""
    cache = _cache(url)
    lost: list[str] = []
    lock = _lock.Lock(
        cache, name, ttl=ttl, timeout=10, on_lost=lambda lease: lost.append(lease.name)
    )
    result: dict[str, Any] = {}
    lock.acquire()
    queue.put(lock.lease.token if lock.lease else "")
    go_path = Path(go)
    deadline = time.monotonic() + 30
    while not go_path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The renewer thread notices the passed deadline right after SIGCONT.
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    result["on_lost"] = list(lost)
    try:
        lock.ensure_held()
        result["ensure_held"] = "held"
    except LockError as exc:
        result["ensure_held"] = type(exc).__name__
    try:
        lock.release()
        result["release"] = "released"
    except LockError as exc:
        result["release"] = type(exc).__name__
    Path(out).write_text(json.dumps(result))


def semaphore_worker(
    url: str, name: str, limit: int, n: int, out: str, ready: Any, go: Any
) -> None:
    """``n`` times: take a permit and count holders inside with a raw INCR/DECR."""
    cache = _cache(url)
    sem = _lock.Semaphore(cache, name, limit=limit, ttl=10, timeout=60)
    raw = redis.Redis.from_url(url)
    peak = 0
    ready.put(os.getpid())
    go.wait(60)
    for _ in range(n):
        with sem:
            inside = int(raw.incr("oracle:inside"))
            peak = max(peak, inside)
            time.sleep(0.001)
            raw.decr("oracle:inside")
    Path(out).write_text(json.dumps({"peak": peak}))


def rw_worker(url: str, name: str, n: int, out: str, ready: Any, go: Any) -> None:
    """Mix of reads and writes; the oracle counts readers and writers inside."""
    cache = _cache(url)
    rw = _lock.RWLock(cache, name, ttl=10, timeout=60)
    raw = redis.Redis.from_url(url)
    bad = 0
    reads = writes = 0
    ready.put(os.getpid())
    go.wait(60)
    for i in range(n):
        if i % 4 == 0:
            with rw.write():
                w = int(raw.incr("oracle:w"))
                r = int(raw.get("oracle:r") or 0)
                bad += w != 1 or r != 0
                time.sleep(0.001)
                raw.decr("oracle:w")
                writes += 1
        else:
            with rw.read():
                raw.incr("oracle:r")
                bad += int(raw.get("oracle:w") or 0) != 0
                time.sleep(0.001)
                raw.decr("oracle:r")
                reads += 1
    Path(out).write_text(json.dumps({"bad": bad, "reads": reads, "writes": writes}))


def cluster_handoff_worker(
    url: str, name: str, n: int, mode: str, fair: bool, ready: Any, go: Any
) -> None:
    """``n`` times, under the lock (``mode``: "sync" or "async"), an unfenced
    read-modify-write of a counter in the lock's own slot, and an RPUSH of
    [fence, entered, left] (time.time(): one clock for every process here)."""
    import asyncio

    from rcache import spi

    cache = _cache(url)
    counter, log = f"{{{name}}}:counter", f"{{{name}}}:log"

    def section(fence: int) -> None:
        entered = time.time()
        value = int(spi.run(cache, lambda c: c.get(counter)) or 0)
        time.sleep(0)  # let another process run here if the lock were broken
        spi.run(cache, lambda c: c.set(counter, value + 1))
        record = json.dumps([fence, entered, time.time()])
        spi.run(cache, lambda c: c.rpush(log, record))

    ready.put(os.getpid())
    go.wait(60)
    if mode == "sync":
        for _ in range(n):
            with cache.lock(name, ttl=10, timeout=60, fair=fair) as held:
                section(held.fence)
    else:

        async def main() -> None:
            for _ in range(n):
                async with cache.lock(name, ttl=10, timeout=60, fair=fair) as held:
                    section(held.fence)  # sync IO in the body: a worker, not an app
            await cache.aclose()

        asyncio.run(main())
    cache.close()
