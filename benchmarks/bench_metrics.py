#!/usr/bin/env python3
"""Overhead of Prometheus metrics per cached call (issue 6 target: <= 3 µs per call).

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 21] [--calls 2000]

Starts its own redis-server (rcache.testing.RedisServer) and times warm hits of the same
``@cache.cached`` function through three caches that differ only in ``metrics=``:

* ``noop``: a sink whose methods do nothing (the floor);
* ``inmemory``: the default ``InMemoryMetrics``;
* ``prometheus``: ``rcache.metrics.PrometheusMetrics(registry=CollectorRegistry())``.

Rounds interleave the variants (so drift hits all alike) and medians are printed. A
Redis round trip is tens of microseconds and jitters by more than the 3 µs being measured,
so the script also times the sink calls alone, exactly as the cached-call path makes them
(a hit: one ``cache_get``; a miss: ``cache_get`` + ``cache_load`` + ``cache_put``); that
isolated figure is the overhead claim. It then re-runs itself with
``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn/Celery prefork mode: values in mmap files).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

import rcache  # noqa: E402
from rcache.metrics import PrometheusMetrics  # noqa: E402
from rcache.testing import RedisServer  # noqa: E402


class NoopMetrics:
    """Implements MetricsSink and does nothing."""

    def register_cache(self, cache: str) -> None: ...
    def cache_get(self, cache: str, result: str) -> None: ...
    def cache_put(self, cache: str) -> None: ...
    def cache_removal(self, cache: str) -> None: ...
    def cache_load(self, cache: str, result: str, seconds: float) -> None: ...
    def cache_error(self, cache: str, operation: str, error: str) -> None: ...
    def breaker_state(self, state: int) -> None: ...
    def register_lock(self, lock: str) -> None: ...
    def lock_acquire(self, lock: str, result: str) -> None: ...
    def lock_wait(self, lock: str, seconds: float) -> None: ...
    def lock_held(self, lock: str, seconds: float) -> None: ...
    def lock_release(self, lock: str, result: str) -> None: ...
    def lock_renewal(self, lock: str, result: str) -> None: ...
    def locks_held_change(self, lock: str, delta: int) -> None: ...
    def lock_eviction_risk(self, policy: str) -> None: ...


def sinks(control: bool = False) -> dict[str, Any]:
    extra = {"noop-again": NoopMetrics()} if control else {}
    return {
        "noop": NoopMetrics(),
        **extra,
        "inmemory": rcache.InMemoryMetrics(),
        "prometheus": PrometheusMetrics(registry=CollectorRegistry()),
    }


def time_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def end_to_end(url: str, rounds: int, calls: int) -> dict[str, float]:
    fns: dict[str, Callable[[], Any]] = {}
    caches = []
    for name, sink in sinks(control=True).items():
        cache = rcache.Cache(url, prefix=f"bench-{name}", metrics=sink)
        caches.append(cache)

        @cache.cached(ttl=600, name="bench.get_user")
        def get_user(user_id: int) -> dict[str, int]:
            return {"id": user_id, "score": 42}

        get_user(1)  # the miss: every timed call below is a warm hit
        fns[name] = functools.partial(get_user, 1)
    for fn in fns.values():
        time_per_call(fn, calls // 4)  # warm up connection pools and caches
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            samples[name].append(time_per_call(fns[name], calls))
    for cache in caches:
        cache.close()
    return {name: statistics.median(s) for name, s in samples.items()}


def sink_only(rounds: int, calls: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, sink in sinks().items():
        sink.register_cache("bench.get_user")

        def hit(s: Any = sink) -> None:
            s.cache_get("bench.get_user", "hit")

        def miss(s: Any = sink) -> None:
            s.cache_get("bench.get_user", "miss")
            s.cache_load("bench.get_user", "success", 0.0004)
            s.cache_put("bench.get_user")

        hits = [time_per_call(hit, calls * 10) for _ in range(rounds)]
        misses = [time_per_call(miss, calls * 10) for _ in range(rounds)]
        out[name] = (statistics.median(hits), statistics.median(misses))
    return out


def report(rounds: int, calls: int, mode: str) -> None:
    print(f"\n== {mode}: {rounds} rounds x {calls} calls, medians ==")
    with RedisServer() as server:
        e2e = end_to_end(server.url, rounds, calls)
    print(
        "warm cached hit, end to end (includes a Redis GET round trip; noop-again is "
        "an A/A control: its distance from noop is the noise floor):"
    )
    for name, us in e2e.items():
        print(f"  {name:<11} {us:8.2f} µs/call   {us / e2e['noop']:.3f}x noop")
    print(
        f"  prometheus - noop     = {e2e['prometheus'] - e2e['noop']:+.2f} µs/call\n"
        f"  prometheus - inmemory = {e2e['prometheus'] - e2e['inmemory']:+.2f} µs/call"
    )
    iso = sink_only(rounds, calls)
    print("sink calls alone, as the cached-call path makes them:")
    for name, (hit, miss) in iso.items():
        print(f"  {name:<11} hit {hit:6.3f} µs   miss {miss:6.3f} µs")
    over_hit = iso["prometheus"][0] - iso["noop"][0]
    over_miss = iso["prometheus"][1] - iso["noop"][1]
    verdict = "OK" if over_hit <= 3 and over_miss <= 3 else "OVER TARGET"
    print(
        f"overhead vs noop: hit {over_hit:.3f} µs, miss {over_miss:.3f} µs "
        f"(target <= 3 µs): {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--no-multiproc",
        action="store_true",
        help="skip the PROMETHEUS_MULTIPROC_DIR re-run",
    )
    parser.add_argument("--mode", default="single-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    report(args.rounds, args.calls, args.mode)
    if args.no_multiproc or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    with tempfile.TemporaryDirectory(prefix="rcache-bench-mp-") as d:
        # A fresh interpreter: prometheus_client picks mmap values at its first import.
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--rounds",
                str(args.rounds),
                "--calls",
                str(args.calls),
                "--mode",
                "multiprocess (PROMETHEUS_MULTIPROC_DIR)",
            ],
            env=env,
            check=True,
        )


if __name__ == "__main__":
    main()
