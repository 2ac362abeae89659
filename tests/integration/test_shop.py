"""The shop example end to end: Flask test client, a real Celery worker, real Redis.

The worker runs as ``celery -A examples.shop.tasks worker --pool=solo`` in a subprocess,
exactly as the README says, against a redis-server this test starts (broker, result
backend and cache).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rcache.testing import RedisServer, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {
        "SHOP_SLOW_QUERY": "0.3",
        "SHOP_REPORT_SECONDS": "0.5",
        "SHOP_WARM_EVERY": "45",
    }
    old = {k: os.environ.get(k) for k in [*env, "REDIS_URL"]}
    log = (tmp_path_factory.mktemp("worker") / "worker.log").open("w")
    worker: subprocess.Popen[bytes] | None = None
    # everything started here is stopped in the finally, also when set-up fails
    with RedisServer() as server:
        try:
            env["REDIS_URL"] = server.url
            os.environ.update(env)
            for name in [m for m in sys.modules if m.startswith("examples.shop")]:
                del sys.modules[name]
            sys.path.insert(0, str(ROOT))
            app_module = importlib.import_module("examples.shop.app")
            store = importlib.import_module("examples.shop.store")
            store.seed(stock=3)
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "examples.shop.tasks",
                    "worker",
                    "--pool=solo",
                    "--loglevel=info",
                    "--without-gossip",
                    "--without-mingle",
                ],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            tasks = importlib.import_module("examples.shop.tasks")
            wait_until(
                lambda: tasks.app.control.ping(timeout=0.5),
                timeout=60,
                message="the Celery worker to answer ping",
            )
            yield app_module.app.test_client(), store, tasks
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            log.close()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if str(ROOT) in sys.path:
                sys.path.remove(str(ROOT))


def test_product_page_slow_once_then_fast(shop: Any) -> None:
    client, _, _ = shop
    first = client.get("/product/1").get_json()
    second = client.get("/product/1").get_json()
    assert first["product"]["name"] == second["product"]["name"]
    assert first["ms"] >= 300  # the slow query ran
    assert second["ms"] < 100  # served from Redis


def test_admin_update_invalidates(shop: Any) -> None:
    client, _, _ = shop
    client.get("/product/2")
    r = client.post("/admin/product/2", json={"price": 12.5})
    assert r.status_code == 200
    assert client.get("/product/2").get_json()["product"]["price"] == 12.5


def test_sync_user_five_clicks_run_once(shop: Any) -> None:
    client, store, tasks = shop
    ids = {client.post("/user/7/sync").get_json()["task_id"] for _ in range(5)}
    assert len(ids) == 1  # the duplicates got the first task's id
    tasks.sync_user.AsyncResult(ids.pop()).get(timeout=30)
    assert store.db.get("shop:synced:7") == "1"


def test_rebuild_report_never_overlaps(shop: Any) -> None:
    client, store, _ = shop
    store.db.delete("shop:report-runs")
    ids = [
        client.post("/report/rebuild?day=2024-11-01").get_json()["task_id"]
        for _ in range(2)
    ]
    wait_until(
        lambda: store.db.llen("shop:report-runs") >= 4 or None,
        timeout=60,
        message="both report runs to finish",
    )
    runs = store.db.lrange("shop:report-runs", 0, -1)
    events = [(float(e.split()[1]), e.split()[0]) for e in runs]
    depth = 0
    for _, kind in sorted(events):
        depth += 1 if kind == "start" else -1
        assert depth <= 1, f"two report runs overlapped: {runs}"
    assert len(ids) == 2


def test_buy_decrements_stock_atomically(shop: Any) -> None:
    client, store, _ = shop
    store.db.set("shopdb:stock:3", 2)
    assert client.post("/product/3/buy").get_json() == {"stock": 1}
    assert client.post("/product/3/buy").get_json() == {"stock": 0}
    assert client.post("/product/3/buy").status_code == 409


def test_metrics_show_what_just_happened(shop: Any) -> None:
    client, _, _ = shop
    client.get("/product/3")
    client.get("/product/3")
    client.post("/admin/product/3", json={"price": 31.0})  # edits under a lock
    text = client.get("/metrics").get_data(as_text=True)

    def value(line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{line_start} not in /metrics")

    assert value('rcache_cache_gets_total{cache="shop.product",result="hit"}') >= 2
    assert value('rcache_cache_gets_total{cache="shop.product",result="miss"}') >= 3
    assert (
        value('rcache_lock_acquires_total{lock="product-edit",result="acquired"}') >= 1
    )
    assert (
        value('rcache_lock_releases_total{lock="product-edit",result="released"}') >= 1
    )


def test_search_page_cached_per_query_string(shop: Any) -> None:
    client, store, _ = shop
    first = client.get("/search?q=data").get_json()
    again = client.get("/search?q=data").get_json()
    other = client.get("/search?q=factorio").get_json()
    assert [p["name"] for p in first["products"]] == [
        "Designing Data-Intensive Applications"
    ]
    assert first["ms"] >= 300  # the slow search ran
    assert again == first  # the same response, replayed from Redis
    assert [p["name"] for p in other["products"]] == ["Factorio"]
    # editing a product drops the search pages (tag "search")
    client.post("/admin/product/2", json={"name": "DDIA"})
    assert client.get("/search?q=data").get_json()["products"] == []
    assert store.cache.prefix == "shop"
