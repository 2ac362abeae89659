"""rcache in one minute: a cached function's miss, hit and invalidation.

Run with ./scripts/demo. Uses $REDIS_URL if set, else starts a throwaway redis-server on
a free port, else falls back to the embedded memory:// backend.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _redis import redis_url

import rcache


def main() -> None:
    with redis_url() as url:
        cache = rcache.Cache(url, prefix="demo")

        @cache.cached(ttl="10m")
        def product(product_id: int) -> dict[str, object]:
            time.sleep(0.3)  # a slow database query
            return {"id": product_id, "name": f"Product {product_id}", "price": 9.99}

        for label in ("miss", "hit", "hit"):
            start = time.perf_counter()
            value = product(42)
            ms = (time.perf_counter() - start) * 1000
            print(f"product(42) -> {value}  [{label}: {ms:.1f} ms]")
        print(f"Redis key: {product.key_for(42)}")
        print(f"invalidate(42) -> {product.invalidate(42)}")
        start = time.perf_counter()
        product(42)
        ms = (time.perf_counter() - start) * 1000
        print(f"product(42) after invalidation -> recomputed [miss: {ms:.1f} ms]")
        cache.close()
    print("demo finished")


if __name__ == "__main__":
    main()
