"""N real processes decrement one stock through cache.transaction / cache.update.

Each worker (tests/concurrency/txworkers.py, started with subprocess) waits for a start
token, then performs M decrements and reports its TransactionStats. The final stock must
be exactly initial - N*M (no lost update, no double apply), and WATCH conflicts must have
happened and been retried (otherwise the test proved nothing about concurrency). Sync
and async workers run side by side. The conflict is certain, not a matter of scheduling
(which a loaded 2-core box did not give): one sync and one async "holder" keep their
first WATCH open until another worker has written the key, and the other workers wait
for those holds before they start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

import rcache
from rcache._transaction import TransactionStats

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).with_name("txworkers.py")
M = 60  # decrements per process
MODES_TX = ["tx", "tx", "atx", "atx"]
MODES_UPDATE = ["update", "update", "aupdate", "aupdate"]
HOLDERS = {0, 2}  # one sync and one async worker (see the module docstring)


def _run_workers(
    redis_client: redis.Redis, url: str, key: str, modes: list[str]
) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                mode,
                url,
                key,
                str(M),
                "hold" if i in HOLDERS else "go",
                str(len(HOLDERS)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, mode in enumerate(modes)
    ]
    try:
        # Every worker BLPOPs one token: they start within microseconds of each other.
        redis_client.rpush(f"{key}:go", *range(len(procs)))
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=75)
            assert proc.returncode == 0, f"worker failed:\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _check(results: list[dict[str, Any]], modes: list[str]) -> int:
    assert sorted(r["mode"] for r in results) == sorted(modes)
    for r in results:
        assert r["calls"] == M
        assert r["commits"] == M
        # Every run of the function either committed or hit a conflict (no transient
        # errors on a healthy local server).
        assert r["attempts"] == r["commits"] + r["conflicts"] + r["transient_retries"]
        if r["role"] == "hold":  # its first EXEC met another worker's write
            assert r["conflicts"] > 0, f"the holder's EXEC was not refused: {r}"
    conflicts = int(sum(r["conflicts"] for r in results))
    assert conflicts > 0, "no WATCH conflict happened: the test did not contend"
    return conflicts


def test_processes_decrement_exactly_through_transaction(
    redis_client: redis.Redis, redis_url: str
) -> None:
    initial = 10_000
    redis_client.set("stock:42", initial)
    results = _run_workers(redis_client, redis_url, "stock:42", MODES_TX)
    _check(results, MODES_TX)
    assert int(redis_client.get("stock:42") or -1) == initial - len(MODES_TX) * M


def test_processes_decrement_exactly_through_update(
    redis_client: redis.Redis, redis_url: str
) -> None:
    cache = rcache.Cache(redis_url, prefix="test")  # the workers' prefix
    initial = 10_000
    cache.set("inventory:9", {"stock": initial, "sku": "A-9"}, ttl=600)
    results = _run_workers(redis_client, redis_url, "inventory:9", MODES_UPDATE)
    _check(results, MODES_UPDATE)
    value = cache.get("inventory:9")
    assert value["stock"] == initial - len(MODES_UPDATE) * M
    assert value["sku"] == "A-9"  # the rest of the JSON value survived every update
    assert 0 < redis_client.pttl("test:k:inventory:9") <= 600_000
    cache.close()


def test_threads_sharing_one_cache_decrement_exactly(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """One Cache (one connection pool) used by several threads at once."""
    cache = rcache.Cache(redis_url, prefix="test")
    redis_client.set("stock:7", 1000)
    stats = TransactionStats()

    def take_one(pipe: Any) -> None:
        stock = int(pipe.get("stock:7"))
        time.sleep(0.0003)  # work between read and write: widens the WATCH window
        pipe.multi()
        pipe.set("stock:7", stock - 1)

    def work() -> None:
        for _ in range(50):
            cache.transaction(take_one, watch=["stock:7"], retries=10_000, stats=stats)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert int(redis_client.get("stock:7") or -1) == 1000 - 200
    assert (stats.calls, stats.commits) == (200, 200)
    assert stats.conflicts > 0
    assert stats.attempts == 200 + stats.conflicts
    cache.close()
