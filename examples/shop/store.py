"""The shop's data and the cached functions over it.

The "database" is a few Redis hashes under ``shopdb:`` so that the web app and the
workers share it without another service; reading it is made slow on purpose
(``SLOW_QUERY``) to show what the cache saves.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

import rcache
from rcache.metrics import PrometheusMetrics

from . import settings

metrics = PrometheusMetrics()  # the default prometheus_client registry
# No URL here: the web app's init_app sets it from app.config, and the Celery worker's
# cache reads $REDIS_URL at first use.
cache = rcache.Cache(prefix="shop", metrics=metrics)
db = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)

CATEGORIES = {"books": [1, 2], "games": [3]}
SEED = {
    1: {"name": "The Art of Computer Programming", "price": 189.0, "category": "books"},
    2: {
        "name": "Designing Data-Intensive Applications",
        "price": 45.0,
        "category": "books",
    },
    3: {"name": "Factorio", "price": 30.0, "category": "games"},
}


class OutOfStockError(Exception):
    pass


def seed(stock: int = 5) -> None:
    for pid, row in SEED.items():
        db.set(f"shopdb:product:{pid}", json.dumps(row))
        db.set(f"shopdb:stock:{pid}", stock)


@cache.cached(
    ttl=settings.PRODUCT_TTL,
    tags=["products", "product:{product_id}"],
    stale=30,
    name="shop.product",
)
def product(product_id: int) -> dict[str, Any] | None:
    time.sleep(settings.SLOW_QUERY)  # the slow query the cache hides
    raw = db.get(f"shopdb:product:{product_id}")
    return None if raw is None else json.loads(raw)


@cache.cached(ttl=settings.PRODUCT_TTL, tags=["products"], name="shop.top_products")
def top_products(category: str) -> list[dict[str, Any]]:
    time.sleep(settings.SLOW_QUERY)
    rows = [db.get(f"shopdb:product:{pid}") for pid in CATEGORIES.get(category, [])]
    return [json.loads(r) for r in rows if r]


def search(text: str) -> list[dict[str, Any]]:
    """Products whose name contains ``text`` (slow on purpose; the web view caches it)."""
    time.sleep(settings.SLOW_QUERY)
    rows = [db.get(f"shopdb:product:{pid}") for pid in SEED]
    found = [json.loads(r) for r in rows if r]
    return [r for r in found if text.lower() in r["name"].lower()]


def update_product(product_id: int, **changes: Any) -> dict[str, Any]:
    """Edit a product under a lock (two admins never interleave their read-modify-write),
    then invalidate the product's tag: one DEL, whatever the number of cached pages."""
    with cache.lock(
        f"product-edit:{product_id}", ttl=10, timeout=5, metrics_name="product-edit"
    ):
        row = json.loads(db.get(f"shopdb:product:{product_id}") or "{}")
        row.update(changes)
        db.set(f"shopdb:product:{product_id}", json.dumps(row))
    # the product's own entries, and the search pages, which may list it
    cache.invalidate_tags(f"product:{product_id}", "search")
    return row


def buy(product_id: int) -> int:
    """Take one item from stock atomically (WATCH/MULTI/EXEC with retries)."""
    key = f"shopdb:stock:{product_id}"

    def take_one(pipe: Any) -> None:
        stock = int(pipe.get(key) or 0)
        if stock <= 0:
            raise OutOfStockError(product_id)
        pipe.multi()
        pipe.set(key, stock - 1)

    cache.transaction(take_one, watch=[key], retries=50)
    return int(db.get(key) or 0)
