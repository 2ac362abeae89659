"""@cache.cached in practice: keys, None, tags, stale-while-revalidate, async, batches.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/cache_decorator.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _redis import redis_url

import rcache

DB = {1: {"name": "Ada", "plan": "pro"}, 2: {"name": "Grace", "plan": "free"}}


def main(url: str) -> None:
    cache = rcache.Cache(url, prefix="example")

    @cache.cached(ttl="10m", tags=["users", "user:{user_id}"], stale="1m")
    def get_user(user_id: int) -> dict[str, str] | None:
        time.sleep(0.1)  # a slow query
        return DB.get(user_id)

    t = time.perf_counter()
    print(
        "get_user(1) ->",
        get_user(1),
        f"(miss, {1000 * (time.perf_counter() - t):.0f} ms)",
    )
    t = time.perf_counter()
    print(
        "get_user(1) ->",
        get_user(1),
        f"(hit, {1000 * (time.perf_counter() - t):.1f} ms)",
    )
    print(
        "get_user(user_id=1) shares the key:",
        get_user.key_for(user_id=1) == get_user.key_for(1),
    )
    print("get_user(99) ->", get_user(99), "(None is cached too: a hit next time)")

    DB[1]["plan"] = "enterprise"
    print("invalidate_tags('user:1') ->", cache.invalidate_tags("user:1"))
    print("get_user(1) ->", get_user(1), "(recomputed after the tag was invalidated)")

    @cache.cached_batch(ttl="10m")
    def plans(ids: list[int]) -> dict[int, str]:
        print(f"   plans() computes only {ids}")
        return {i: DB[i]["plan"] for i in ids if i in DB}

    print("plans([1]) ->", plans([1]))
    print("plans([1, 2]) ->", plans([1, 2]))

    @cache.cached(ttl=60)
    async def greeting(name: str) -> str:
        await asyncio.sleep(0.05)
        return f"hello {name}"

    async def run_async() -> None:
        results = await asyncio.gather(*(greeting("world") for _ in range(10)))
        print("10 concurrent async callers ->", set(results), "(computed once)")
        print(
            "await greeting.invalidate('world') ->", await greeting.invalidate("world")
        )
        await cache.aclose()

    asyncio.run(run_async())
    cache.close()


if __name__ == "__main__":
    with redis_url() as url:
        main(url)
    print("cache_decorator example finished")
