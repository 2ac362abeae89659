"""cache.clear() beside a naive KEYS + DEL, on a namespace of 200,000 keys.

Not a test. Starts its own redis-server (rcache.testing.RedisServer) and, for each
method, fills ``--keys`` keys (64-byte values) under a prefix plus keys outside it, then
deletes the namespace while a separate process PINGs the server in a loop
(``_probe.py``). Prints, per method:

* throughput (keys deleted per second, wall time of the whole operation);
* the longest single command on the server (SLOWLOG, every command logged) and the
  median/p99 of the commands it sent;
* what another client felt: the longest and p99 PING round trip during the operation.

The naive method is what Flask-Caching's ``clear()`` and python-redis-lock's
``reset_all`` do: ``KEYS prefix:*`` then one ``DEL`` of everything.

Usage::

    .venv/bin/python benchmarks/bench_admin.py
    .venv/bin/python benchmarks/bench_admin.py --keys 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table

import rcache
from rcache.testing import RedisServer

PROBE = Path(__file__).resolve().parent / "_probe.py"


def fill(r: redis.Redis, prefix: str, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:c:shop.f:[{i}]", b"x" * 64)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    for i in range(100):  # neighbours that must survive
        r.set(f"{prefix}2:k:{i}", b"keep")


def naive(url: str, prefix: str) -> int:
    r = redis.Redis.from_url(url, socket_timeout=60)
    keys = r.keys(f"{prefix}:*")
    n = int(r.delete(*keys)) if keys else 0
    r.close()
    return n


def with_rcache(url: str, prefix: str) -> int:
    cache = rcache.Cache(url, prefix=prefix)
    result = cache.clear()
    cache.close()
    return result.deleted


def measure(
    server: RedisServer, n: int, method: Callable[[str, str], int]
) -> dict[str, Any]:
    r = server.client()
    r.flushall()
    fill(r, "bench", n)
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 100_000)
    r.slowlog_reset()
    probe = subprocess.Popen(
        [sys.executable, str(PROBE), server.url, "probe:stop"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout is not None
    assert probe.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    deleted = method(server.url, "bench")
    seconds = time.perf_counter() - t0
    r.set("probe:stop", 1)
    seen = json.loads(probe.stdout.readline())
    probe.wait(timeout=30)
    probe.stdout.close()
    durations = sorted(
        e["duration"] / 1000
        for e in r.slowlog_get(1_000_000)
        if e["command"].split()[0].decode().upper() in {"SCAN", "UNLINK", "KEYS", "DEL"}
    )
    assert deleted == n, (deleted, n)
    assert r.dbsize() == 101, "a key outside the prefix was deleted"
    r.close()
    return {
        "seconds": seconds,
        "rate": n / seconds,
        "commands": len(durations),
        "median_ms": statistics.median(durations),
        "p99_ms": durations[math.ceil(len(durations) * 0.99) - 1],  # nearest rank
        "max_ms": durations[-1],
        "ping_p99_ms": seen["p99_ms"],
        "ping_max_ms": seen["max_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    methods = {
        "rcache cache.clear() (SCAN + UNLINK, 500/batch)": with_rcache,
        "naive KEYS + DEL": naive,
    }
    rows = []
    with RedisServer() as server:
        version = server.client().info("server")["redis_version"]
        for label, method in methods.items():
            runs = [measure(server, args.keys, method) for _ in range(args.rounds)]

            def med(field: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r[field] for r in runs)

            rows.append(
                [
                    label,
                    f"{med('rate'):,.0f}",
                    f"{med('seconds'):.2f}",
                    f"{med('commands'):.0f}",
                    f"{med('median_ms'):.2f} / {med('p99_ms'):.2f} / {med('max_ms'):.2f}",
                    f"{med('ping_p99_ms'):.2f} / {med('ping_max_ms'):.2f}",
                ]
            )
    print(
        f"Deleting {args.keys:,} keys (64-byte values) under a prefix, redis-server "
        f"{version} on loopback, median of {args.rounds} rounds\n"
    )
    print(
        table(
            rows,
            [
                "method",
                "keys/s",
                "seconds",
                "commands",
                "server ms per command: median / p99 / longest",
                "concurrent PING ms: p99 / max",
            ],
        )
    )


if __name__ == "__main__":
    main()
