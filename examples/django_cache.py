"""Django's cache API on rcache: CACHES, incr from several processes, a lock, async.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/django_cache.py
(needs the extra: pip install 'rcache-redis[django]')
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import django
from _redis import redis_url
from django.conf import settings


def setup(url: str) -> None:
    if not settings.configured:
        settings.configure(
            SECRET_KEY="example-only-" + "x" * 40,
            CACHES={
                "default": {
                    "BACKEND": "rcache.django.RCacheBackend",
                    "LOCATION": url,
                    "KEY_PREFIX": "example",
                    "TIMEOUT": 60,
                }
            },
        )
        django.setup()


def count_visits(url: str, n: int) -> None:
    setup(url)
    from django.core.cache import cache

    for _ in range(n):
        cache.incr("visits")  # one atomic Lua call: no lost update between processes


async def async_part() -> None:
    from django.core.cache import cache

    await cache.aset("recent", ["a", "b"])
    print("aget ->", await cache.aget("recent"))
    await cache.rcache.aclose()


def main() -> None:
    with redis_url() as url:
        setup(url)
        from django.core.cache import cache

        cache.set("greeting", {"text": "hello", "when": (2024, 11)})
        print("get ->", cache.get("greeting"))
        print("get_or_set ->", cache.get_or_set("answer", lambda: 42))

        cache.set("visits", 0, timeout=None)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=count_visits, args=(url, 100)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        print("visits after 3 processes x 100 incr ->", cache.get("visits"))
        assert cache.get("visits") == 300

        with cache.lock("nightly-report", ttl=10, timeout=5) as lock:
            print("holding", lock, "fence", lock.fence)

        asyncio.run(async_part())
        cache.clear()
        cache.rcache.close()
    print("finished")


if __name__ == "__main__":
    main()
