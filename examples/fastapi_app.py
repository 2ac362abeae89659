"""A FastAPI app using rcache: lifespan, typed cached functions, cached responses, metrics.

Serve it (the cache reads $REDIS_URL at first use):

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app --port 8000
    curl http://127.0.0.1:8000/items/1          # slow once, then from Redis
    curl 'http://127.0.0.1:8000/search?q=book'  # the whole answer cached per query
    curl http://127.0.0.1:8000/metrics

Or run it as a script: it calls itself through FastAPI's test client and prints what
happened (against $REDIS_URL, else a throwaway redis-server).
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import rcache
import rcache.fastapi
from rcache.metrics import PrometheusMetrics

SLOW = float(os.environ.get("EXAMPLE_SLOW_QUERY", "0.2"))


class Item(BaseModel):
    id: int
    name: str
    price: float
    tags: list[str] = []


DB = {
    1: Item(id=1, name="The Art of Computer Programming", price=189.0, tags=["book"]),
    2: Item(id=2, name="Designing Data-Intensive Applications", price=45.0),
    3: Item(id=3, name="Factorio", price=30.0, tags=["game"]),
}

# At import time, with no URL: the lifespan configures it when the app starts.
cache = rcache.Cache(metrics=PrometheusMetrics())
app = FastAPI(
    title="rcache example", lifespan=rcache.fastapi.lifespan(cache, prefix="api")
)
rcache.fastapi.serve_metrics(app)  # GET /metrics, no redirect


@cache.cached(ttl="5m", tags=["item:{item_id}"])
async def load_item(item_id: int) -> Item | None:
    """The slow query; the return annotation brings cached Items back as Items."""
    await asyncio.sleep(SLOW)
    return DB.get(item_id)


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> Item:
    item = await load_item(item_id)
    if item is None:
        raise HTTPException(404, "no such item")
    return item


@app.get("/search")
@rcache.fastapi.cached_response(cache, ttl=60, vary=["Accept-Language"], tags=["items"])
async def search(q: str = "", limit: int = 10) -> list[Item]:
    """Keyed on the query string (and the language): ?q=a and ?q=b are two entries."""
    await asyncio.sleep(SLOW)
    found = [i for i in DB.values() if q.lower() in (i.name + " ".join(i.tags)).lower()]
    return found[:limit]


@app.put("/items/{item_id}")
async def update_item(item_id: int, item: Item, c: rcache.fastapi.CacheDep) -> Item:
    DB[item_id] = item
    await c.ainvalidate_tags(f"item:{item_id}", "items")  # O(1), whatever is cached
    return item


def main() -> None:
    from fastapi.testclient import TestClient

    from examples._redis import redis_url

    with redis_url(memory_ok=False) as url:
        os.environ["REDIS_URL"] = url
        with TestClient(app) as client:
            for label in ("miss", "hit"):
                start = time.perf_counter()
                body = client.get("/items/1").json()
                ms = (time.perf_counter() - start) * 1000
                print(f"GET /items/1 [{label}: {ms:.0f} ms] -> {body['name']}")
            a = client.get("/search?q=book").json()
            b = client.get("/search?q=game").json()
            print(
                f"/search?q=book -> {[i['id'] for i in a]}, ?q=game -> {[i['id'] for i in b]}"
            )
            client.put("/items/1", json={"id": 1, "name": "TAOCP", "price": 150.0})
            print("after PUT:", client.get("/items/1").json()["name"])
            metrics = client.get("/metrics").text
            hits = [
                line for line in metrics.splitlines() if "cache_gets_total{" in line
            ]
            print("metrics:", len(hits), "cache_gets series")
    print("fastapi example finished")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
