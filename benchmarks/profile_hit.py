"""Where the microseconds of a warm sync hit go (rcache @cached vs GET + json.loads).

Times each step of the hit path on its own, interleaved, in one process against a
throwaway redis-server, and prints a breakdown (medians of --reps rounds of --calls).
Beside each time, the Python bytecodes one call executes (sys.settrace with opcode
events): a figure that does not move with the machine's load, so a change to the hit
path can be judged on a busy machine, where the times spread by 2x (this VM has no
hardware performance counters for perf).

Steps that reach into rcache's internals are skipped (and named) when the internals
they use have changed.

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


def bytecodes(fn: Callable[[], Any], n: int = 20) -> float:
    """Python bytecodes executed per call of ``fn`` (C code counts as one call)."""
    for _ in range(3):
        fn()
    ops = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal ops
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            ops += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            fn()
    finally:
        sys.settrace(None)
    return ops / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000)
    opts = parser.parse_args()
    with RedisServer() as server:
        cache = rcache.Cache(server.url, prefix="prof")

        @cache.cached(ttl=600, name="plain", stampede=False)
        def plain(x: int) -> dict[str, Any]:
            return PAYLOAD

        @cache.cached(
            ttl=600, name="f", tags=["users", "user:{x}"], early=True, stale=60
        )
        def f(x: int) -> dict[str, Any]:
            return PAYLOAD

        plain(42), f(42)
        raw_client = server.client()
        raw_client.set("raw", json.dumps(PAYLOAD))
        key = f.key_for(42)  # type: ignore[attr-defined]
        steps: dict[str, Callable[[], Any]] = {
            "floor: GET + json.loads": lambda: json.loads(raw_client.get("raw")),  # type: ignore[arg-type]
            "rcache @cached hit, no options (stampede=False)": lambda: plain(42),
            "rcache @cached hit, stampede + tags + early + stale": lambda: f(42),
        }
        skipped = []

        def step(name: str, make: Callable[[], Callable[[], Any]]) -> None:
            try:
                fn = make()
                fn()
            except (AttributeError, TypeError, KeyError) as exc:
                skipped.append(f"{name.strip()} ({type(exc).__name__}: {exc})")
                return
            steps[name] = fn

        def internals() -> tuple[Any, Any, list[str], list[Any]]:
            spec = f._spec  # type: ignore[attr-defined]
            client = cache._sync.client
            stamp_keys = spec.stamp_keys((42,), {}, key)
            return spec, client, stamp_keys, client.mget([key, *stamp_keys])

        step(
            "  redis-py MGET of value + 3 stamps (1 round trip)",
            lambda: (lambda s, c, k, r: lambda: c.mget([key, *k]))(*internals()),
        )
        step(
            "  redis-py GET of the value alone",
            lambda: (lambda s, c, k, r: lambda: c.get(key))(*internals()),
        )
        step(
            "  key: bind arguments + canonical JSON (scalar fast path)",
            lambda: (lambda s, c, k, r: lambda: s.keys.build((42,), {}))(*internals()),
        )
        step(
            "  tag keys rendered from the arguments",
            lambda: (lambda s, c, k, r: lambda: s.stamp_keys((42,), {}, key))(
                *internals()
            ),
        )
        step(
            "  envelope decode + JSON payload",
            lambda: (lambda s, c, k, r: lambda: cache._envelope("f", r[0]))(
                *internals()
            ),
        )
        step(
            "  stamp check (blob compare)",
            lambda: (lambda s, c, k, r: lambda: stamp_blob(r[1:]))(*internals()),
        )
        step(
            "  freshness decision",
            lambda: (lambda s, env: lambda: s.freshness.classify(env, time.time()))(
                internals()[0], cache._envelope("f", internals()[3][0])
            ),
        )
        steps["  metrics (InMemoryMetrics counter)"] = lambda: cache.metrics.cache_get(
            "f", "hit"
        )
        results: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(opts.reps):
            for name, fn in steps.items():  # interleaved: noise hits every step alike
                results[name].append(per_call(fn, opts.calls))
        med = {k: statistics.median(v) for k, v in results.items()}
        ops = {k: bytecodes(fn) for k, fn in steps.items()}
        floor, floor_ops = (
            med["floor: GET + json.loads"],
            ops["floor: GET + json.loads"],
        )
        rows_out = [
            [
                k,
                f"{v:.1f}",
                f"{ops[k]:.0f}",
                f"{v / floor:.2f}x" if not k[0].isspace() else "",
            ]
            for k, v in med.items()
        ]
        print(
            f"Warm sync hit, medians of {opts.reps} x {opts.calls} calls (us per call)\n"
        )
        print(table(rows_out, ["step", "us", "bytecodes", "vs floor"]))
        for name in ("rcache @cached hit, no options (stampede=False)",
                     "rcache @cached hit, stampede + tags + early + stale"):  # fmt: skip
            print(
                f"\n{name}: {med[name] - floor:+.1f} us, "
                f"{ops[name] - floor_ops:+.0f} bytecodes above the floor"
            )
        if skipped:
            print("\nskipped (internals changed): " + "; ".join(skipped))


if __name__ == "__main__":
    main()
