"""Where the microseconds of a warm sync hit go (rcache @cached vs GET + json.loads).

Times each step of the hit path on its own, interleaved, in one process against a
throwaway redis-server, and prints a breakdown (medians of --reps rounds of --calls).

    uv run python benchmarks/profile_hit.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import table

import rcache
from rcache._freshness import stamp_blob
from rcache.testing import RedisServer

PAYLOAD = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "active": True,
    "score": 99.5,
}


def per_call(fn: Callable[[], Any], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000)
    opts = parser.parse_args()
    with RedisServer() as server:
        cache = rcache.Cache(server.url, prefix="prof", metrics=None)

        @cache.cached(ttl=600, name="f", tags=["users", "user:{x}"])
        def f(x: int) -> dict[str, Any]:
            return PAYLOAD

        f(42)
        spec = f._spec  # type: ignore[attr-defined]
        client = cache._sync.client
        key = f.key_for(42)
        stamp_keys = spec.stamp_keys((42,), {})
        raw_client = server.client()
        raw_client.set("raw", json.dumps(PAYLOAD))
        rows = client.mget([key, *stamp_keys])
        raw = rows[0]
        steps: dict[str, Callable[[], Any]] = {
            "floor: GET + json.loads": lambda: json.loads(raw_client.get("raw")),  # type: ignore[arg-type]
            "rcache @cached hit, end to end": lambda: f(42),
            "  redis-py MGET of value + 3 stamps (1 round trip)": lambda: client.mget(
                [key, *stamp_keys]
            ),
            "  redis-py GET of the value alone": lambda: client.get(key),
            "  MGET through rcache's driver (breaker, error mapping)": lambda: (
                cache._mget_raw([key, *stamp_keys], "f", "bypass")
            ),
            "  read + decide, no single-flight registration": lambda: f._fetch(  # type: ignore[attr-defined]
                key, stamp_keys, (42,), {}
            ),
            "  key: bind arguments + canonical JSON": lambda: spec.keys.build(
                (42,), {}
            ),
            "  tag keys rendered from the arguments": lambda: spec.stamp_keys(
                (42,), {}
            ),
            "  envelope decode + JSON payload": lambda: cache._envelope("f", raw),
            "  stamp check (blob compare)": lambda: stamp_blob(rows[1:]),
            "  freshness decision": lambda: spec.freshness.classify(None, time.time()),
            "  metrics (InMemoryMetrics counter)": lambda: cache.metrics.cache_get(
                "f", "hit"
            ),
        }
        results: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(opts.reps):
            for name, fn in steps.items():  # interleaved: noise hits every step alike
                results[name].append(per_call(fn, opts.calls))
        med = {k: statistics.median(v) for k, v in results.items()}
        rows_out = [[k, f"{v:.1f}"] for k, v in med.items()]
        print(
            f"Warm sync hit, medians of {opts.reps} x {opts.calls} calls (us per call)\n"
        )
        print(table(rows_out, ["step", "us"]))
        overhead = (
            med["rcache @cached hit, end to end"] - med["floor: GET + json.loads"]
        )
        mget_extra = (
            med["  redis-py MGET of value + 3 stamps (1 round trip)"]
            - med["  redis-py GET of the value alone"]
        )
        print(
            f"\nrcache above the floor: {overhead:+.1f} us; of which MGET of 4 keys "
            f"instead of GET: {mget_extra:+.1f} us"
        )


if __name__ == "__main__":
    main()
