"""The shop's web app (Flask). Run: flask --app examples.shop.app run"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Flask, jsonify, request

from rcache.flask import FlaskCache, serve_metrics

from . import settings
from .store import (
    OutOfStockError,
    buy,
    cache,
    product,
    search,
    seed,
    top_products,
    update_product,
)
from .tasks import build_report, sync_user

web = FlaskCache(cache)  # the Flask side of the shop's cache


def create_app() -> Flask:
    app = Flask("shop")
    app.config["RCACHE_URL"] = settings.REDIS_URL
    web.init_app(app)

    @app.get("/search")
    @web.cached_view(
        ttl=settings.PRODUCT_TTL, vary=["Accept-Language"], tags=["search"]
    )
    def search_page() -> Any:
        # keyed on ?q=... (and the language): /search?q=a and /search?q=b differ
        start = time.perf_counter()
        found = search(request.args.get("q", ""))
        return jsonify(
            products=found, ms=round((time.perf_counter() - start) * 1000, 2)
        )

    @app.get("/product/<int:product_id>")
    def product_page(product_id: int) -> Any:
        start = time.perf_counter()
        row = product(product_id)
        ms = (time.perf_counter() - start) * 1000
        if row is None:
            return jsonify(error="no such product"), 404
        return jsonify(product=row, ms=round(ms, 2))

    @app.get("/category/<name>")
    def category_page(name: str) -> Any:
        return jsonify(products=top_products(name))

    @app.post("/admin/product/<int:product_id>")
    def admin_update(product_id: int) -> Any:
        return jsonify(product=update_product(product_id, **(request.get_json() or {})))

    @app.post("/report/rebuild")
    def rebuild_report() -> Any:
        day = request.args.get("day") or dt.date.today().isoformat()
        result = build_report.delay(day)
        return jsonify(task_id=result.id), 202

    @app.post("/user/<int:user_id>/sync")
    def user_sync(user_id: int) -> Any:
        result = sync_user.delay(user_id)
        return jsonify(task_id=result.id), 202

    @app.post("/product/<int:product_id>/buy")
    def buy_one(product_id: int) -> Any:
        try:
            left = buy(product_id)
        except OutOfStockError:
            return jsonify(error="out of stock"), 409
        return jsonify(stock=left)

    @app.post("/admin/seed")
    def admin_seed() -> Any:
        seed(int(request.args.get("stock", "5")))
        return jsonify(ok=True)

    # /metrics: rcache's Prometheus metrics; sums all workers when gunicorn runs with
    # PROMETHEUS_MULTIPROC_DIR set (see gunicorn.conf.py)
    serve_metrics(app)
    return app


app = create_app()
