"""Prometheus metrics: cache and lock traffic, scraped from rcache's own /metrics server.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/metrics_http.py
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _redis import redis_url
from prometheus_client import CollectorRegistry

import rcache
from rcache.metrics import PrometheusMetrics, start_http_server


def main(url: str) -> None:
    registry = CollectorRegistry()  # your app would use the default registry
    cache = rcache.Cache(
        url, prefix="example", metrics=PrometheusMetrics(registry=registry)
    )

    @cache.cached(ttl=60, name="catalog.price")
    def price(sku: str) -> float:
        return 9.99

    for sku in ("a", "a", "a", "b"):
        price(sku)  # 2 misses, 2 hits
    with cache.lock("nightly-report", ttl=10):
        pass

    server = start_http_server(0, registry=registry)  # port 0: any free port
    try:
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    finally:
        server.close()
    print(f"scraped {server.url}:")
    for line in text.splitlines():
        if line.startswith(
            ("rcache_cache_gets_total", "rcache_lock_acquires_total")
        ) and (
            'result="hit"' in line
            or 'result="miss"' in line
            or 'result="acquired"' in line
        ):
            print("  ", line)
    print("hit ratio is computed in PromQL, see contrib/prometheus/rules.yml")


if __name__ == "__main__":
    with redis_url() as url:
        main(url)
    print("metrics_http example finished")
