"""Django cache backends: a warm ``get`` hit, rcache's beside Django's and django-redis.

Not a test. Starts its own redis-server (rcache.testing.RedisServer) on a free port,
configures Django with one alias per backend on it, stores the same 5-field dict under
one key in each, then times ``caches[alias].get(key)`` (and ``await aget(key)``) in
short batches, interleaved and rotated between backends, several repetitions; prints the
median wall and client-CPU microseconds per call and each backend's ratio to Django's
built-in RedisCache::

    uv run --group bench python benchmarks/bench_django.py
    uv run --group bench python benchmarks/bench_django.py --calls 2000 --reps 21

Backends: ``rcache.django.RCacheBackend`` with its default JSON serializer and with the
signed pickle one; ``django.core.cache.backends.redis.RedisCache`` (pickle);
``django_redis.cache.RedisCache`` with its DefaultClient (pickle). Every hit is one GET.
Django's and django-redis's ``aget`` are BaseCache's ``sync_to_async`` around ``get``;
rcache's is native asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import django
import redis
from django.conf import settings

import rcache
from rcache.testing import RedisServer

VALUE = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "active": True,
    "score": 97.5,
}

BACKENDS = {
    "rcache (json)": {"BACKEND": "rcache.django.RCacheBackend"},
    "rcache (signed pickle)": {
        "BACKEND": "rcache.django.RCacheBackend",
        "OPTIONS": {"serializer": "pickle", "prefix": "rcache-pickle"},
    },
    "django RedisCache": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "KEY_PREFIX": "django-builtin",
    },
    "django-redis": {
        "BACKEND": "django_redis.cache.RedisCache",
        "KEY_PREFIX": "django-redis",
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
    },
}
BASELINE = "django RedisCache"


def _sync_batch(cache: Any, calls: int) -> tuple[float, float]:
    """(wall µs, this process's CPU µs) per call."""
    get = cache.get
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        get("user")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall / calls * 1e6, cpu / calls * 1e6


async def _async_batch(cache: Any, calls: int) -> tuple[float, float]:
    aget = cache.aget
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await aget("user")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall / calls * 1e6, cpu / calls * 1e6


def run(calls: int, reps: int, async_calls: int) -> None:
    import django_redis

    with RedisServer() as server:
        settings.configure(
            SECRET_KEY="bench-" + "x" * 40,
            CACHES={
                name: {**params, "LOCATION": server.url}
                for name, params in BACKENDS.items()
            },
        )
        django.setup()
        from django.core.cache import caches

        names = list(BACKENDS)
        for name in names:
            caches[name].set("user", VALUE, timeout=None)
            assert caches[name].get("user") == VALUE, name
            _sync_batch(caches[name], 200)  # warm up: connections, code paths
        sync: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                sync[name].append(_sync_batch(caches[name], calls))

        async def measure_async() -> dict[str, list[tuple[float, float]]]:
            # one backend object per alias for the whole loop (Django would make one
            # per task; the point here is the call path, not construction)
            backends = {n: caches[n] for n in names}
            out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
            for name in names:
                await _async_batch(backends[name], 50)
            for rep in range(reps):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    out[name].append(await _async_batch(backends[name], async_calls))
            await backends["rcache (json)"].rcache.aclose()
            await backends["rcache (signed pickle)"].rcache.aclose()
            return out

        asynch = asyncio.run(measure_async())
        for name in names:
            caches[name].clear()

    print(
        f"python {sys.version.split()[0]}, django {django.get_version()}, "
        f"django-redis {'.'.join(map(str, django_redis.VERSION))}, redis-py "
        f"{redis.__version__}, rcache {rcache.__version__}; warm get hit of a 5-field "
        f"dict; {calls} sync / {async_calls} async calls per batch, {reps} batches per "
        "backend, interleaved and rotated. Wall and client CPU µs per call: median of "
        "the batches (min-max); ratio = backend / Django's RedisCache (below 1: faster)"
    )
    print()
    print(
        "| backend | get wall µs | ratio | get CPU µs | ratio "
        "| aget wall µs | ratio | aget CPU µs | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def cells(rows: list[tuple[float, float]], base: list[tuple[float, float]]) -> str:
        out = []
        for i in (0, 1):
            values = [r[i] for r in rows]
            med = statistics.median(values)
            ref = statistics.median(r[i] for r in base)
            out.append(
                f"{med:.1f} ({min(values):.0f}-{max(values):.0f}) | {med / ref:.2f}"
            )
        return " | ".join(out)

    for name in names:
        print(
            f"| {name} | {cells(sync[name], sync[BASELINE])} | "
            f"{cells(asynch[name], asynch[BASELINE])} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="sync gets per batch")
    parser.add_argument("--async-calls", type=int, default=500)
    parser.add_argument("--reps", type=int, default=15, help="batches per backend")
    args = parser.parse_args()
    run(args.calls, args.reps, args.async_calls)


if __name__ == "__main__":
    main()
