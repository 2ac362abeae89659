"""A latency probe: a separate process PINGs Redis in a loop and reports the longest
round trip it saw, which is how long the server kept it waiting (plus scheduling noise).

Run as ``python _probe.py URL STOPKEY``: prints ``ready``, PINGs until STOPKEY exists,
then prints one JSON line ``{"pings": n, "max_ms": .., "p99_ms": .., "p50_ms": ..}``.
Used by benchmarks/bench_admin.py and tests/integration/test_admin_blocking.py.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import redis


def main(url: str, stop_key: str) -> None:
    r = redis.Redis.from_url(url)
    r.ping()
    print("ready", flush=True)
    samples: list[float] = []
    n = 0
    while True:
        t = time.perf_counter()
        r.ping()
        samples.append((time.perf_counter() - t) * 1000)
        n += 1
        if n % 20 == 0 and r.exists(stop_key):
            break
    samples.sort()
    print(
        json.dumps(
            {
                "pings": len(samples),
                "max_ms": samples[-1],
                "p99_ms": samples[int(len(samples) * 0.99) - 1],
                "p50_ms": statistics.median(samples),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
