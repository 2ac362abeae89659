"""FastAPI: a cached Pydantic-model hit, rcache beside fastapi-cache2 (the FastAPI anchor).

Both libraries run in the same process and run, against the same throwaway redis-server
(started here), repetitions interleaved so that drift of a shared machine hits both:

* **function**: ``await get_user(1)``, an ``async def`` returning a Pydantic model,
  decorated with ``@cache.cached(ttl=...)`` (rcache) or ``@cache(expire=...)``
  (fastapi-cache2), called directly: the decorators' own hit path;
* **endpoint**: ``GET /users/1`` through FastAPI in-process (httpx2's ASGI transport,
  no sockets), decorated with ``rcache.fastapi.cached_response`` or fastapi-cache2's
  ``@cache``; an uncached endpoint returning the same model is the framework's floor.

Figures are medians of per-call latency (µs) over --reps repetitions of --calls warm
hits, with the spread of the repetitions; "cmds/hit" are Redis commands per hit from
INFO commandstats deltas (both libraries make one round trip).

    uv run --group bench python benchmarks/bench_frameworks.py [--reps 5] [--calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.backends.redis import RedisBackend
from fastapi_cache.decorator import cache as fc_cache
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).parent))
from _common import commandstats, median_spread, table

import rcache
import rcache.fastapi
from rcache.testing import RedisServer


class User(BaseModel):
    id: int
    name: str
    email: str
    active: bool
    score: float
    roles: list[str]


def user(i: int) -> User:
    return User(
        id=i,
        name="Ada Lovelace",
        email="ada@example.com",
        active=True,
        score=99.5,
        roles=["admin", "author"],
    )


async def per_call(fn: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """(median µs per call, process CPU µs per call): CPU time is the steadier figure
    on a loaded machine, where waking up after each socket read can take milliseconds."""
    lat = []
    cpu = time.process_time()
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e6, (time.process_time() - cpu) / calls * 1e6


async def commands_per_call(
    client: redis.Redis, fn: Callable[[], Awaitable[Any]], calls: int = 200
) -> float:
    before = commandstats(client)
    for _ in range(calls):
        await fn()
    after = commandstats(client)
    return (sum(after.values()) - sum(before.values())) / calls


async def run(url: str, reps: int, calls: int) -> str:
    cache = rcache.Cache(url, prefix="bench-rc")
    fc_redis = redis.asyncio.Redis.from_url(url)
    FastAPICache.init(RedisBackend(fc_redis), prefix="bench-fc")

    @cache.cached(ttl=600)
    async def rc_get_user(i: int) -> User:
        return user(i)

    @fc_cache(expire=600)
    async def fc_get_user(i: int) -> User:
        return user(i)

    app = FastAPI()

    @app.get("/rc/users/{i}")
    @rcache.fastapi.cached_response(cache, ttl=600)
    async def rc_endpoint(i: int) -> User:
        return user(i)

    @app.get("/fc/users/{i}")
    @fc_cache(expire=600)
    async def fc_endpoint(i: int) -> User:
        return user(i)

    @app.get("/plain/users/{i}")
    async def plain_endpoint(i: int) -> User:
        return user(i)

    transport = httpx2.ASGITransport(app=app)
    http = httpx2.AsyncClient(transport=transport, base_url="http://bench")

    async def get(path: str) -> Any:
        r = await http.get(path)
        assert r.status_code == 200
        return r

    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "fn rcache": lambda: rc_get_user(1),
        "fn fastapi-cache2": lambda: fc_get_user(1),
        "ep rcache": lambda: get("/rc/users/1"),
        "ep fastapi-cache2": lambda: get("/fc/users/1"),
        "ep uncached": lambda: get("/plain/users/1"),
    }
    # warm, and check what a hit returns
    for fn in cases.values():
        await fn()
        await fn()
    rc_hit, fc_hit = await rc_get_user(1), await fc_get_user(1)
    bodies = {
        (await get(p)).text for p in ("/rc/users/1", "/fc/users/1", "/plain/users/1")
    }
    assert len(bodies) == 1, bodies  # the same JSON from all three endpoints

    client = redis.Redis.from_url(url)
    cmds = {name: await commands_per_call(client, fn) for name, fn in cases.items()}
    client.close()
    results: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():  # interleaved: drift hits every case alike
            wall, used = await per_call(fn, calls)
            results[name].append(wall)
            cpu[name].append(used)
    await http.aclose()
    await fc_redis.aclose()
    await cache.aclose()

    med = {name: statistics.median(v) for name, v in results.items()}
    mcpu = {name: statistics.median(v) for name, v in cpu.items()}
    rows = []
    for label, kind in (
        ("`@cache.cached` -> User, direct call", "fn"),
        ("`GET /users/1` through FastAPI", "ep"),
    ):
        rc, fc = f"{kind} rcache", f"{kind} fastapi-cache2"
        rows.append(
            [
                label,
                median_spread(results[rc]),
                median_spread(results[fc]),
                f"{med[rc] / med[fc]:.2f}",
                f"{mcpu[rc]:.0f} / {mcpu[fc]:.0f}",
                f"{mcpu[rc] / mcpu[fc]:.2f}",
                f"{cmds[rc]:g} / {cmds[fc]:g}",
            ]
        )
    out = table(
        rows,
        [
            "warm hit of a Pydantic model",
            "rcache p50 µs",
            "fastapi-cache2 p50 µs",
            "p50 ratio",
            "CPU µs/hit rc / fc2",
            "CPU ratio",
            "cmds/hit rc / fc2",
        ],
    )
    floor = (
        f"{median_spread(results['ep uncached'])} µs p50, "
        f"{mcpu['ep uncached']:.0f} µs CPU"
    )
    return (
        f"{out}\n\nUncached endpoint returning the same model (FastAPI's own cost): "
        f"{floor}. A direct hit returns `{type(rc_hit).__name__}` from rcache and "
        f"`{type(fc_hit).__name__}` from fastapi-cache2 0.2 (its JsonCoder returns the "
        "decoded dict; the endpoint row is equal because FastAPI's response model "
        "renders a dict and a model alike).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with RedisServer() as server:
        print(asyncio.run(run(server.url, args.reps, args.calls)))


if __name__ == "__main__":
    main()
