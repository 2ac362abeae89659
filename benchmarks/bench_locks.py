"""rcache's lock beside redis-py's Lock, python-redis-lock and pottery, in one run.

Not a test. Starts its own redis-server (rcache.testing.RedisServer) on a free port and
prints, for every implementation:

1. uncontended acquire + release: median latency and its ratio to two raw GETs
   (issue 13 target for rcache's acquire/release: <= 1.10x; acquire and release are one
   round trip each), printed with PASS/FAIL beside the peers' ratios of the same run,
   and floor rows sent with redis-py's plain client: two EVALSHA of ``return 1`` (what
   any script costs), redis-py Lock's commands (SET NX PX, EVALSHA of its release) and
   rcache's own two scripts (EVALSHA lock_acquire + lock_release, no rcache Python):
   the last is what rcache's lock cannot go below with its scripts. Subjects are
   interleaved in slices of 50, every one once per round in a rotating order;
2. hand-off latency with one waiter: a holder process releases, a waiter process that
   is already blocked acquires; p50/p99 of (acquired - released) on the system-wide
   monotonic clock (target p50 <= 3 ms);
3. per-process spread with 6 contender processes, each looping acquire / hold 5 ms /
   release: total acquisitions and max/min per process (target max/min <= 3);
4. Redis load per acquisition during (3): commands the server executed (INFO
   commandstats delta; commands run inside Lua scripts included) and client round trips
   (redis-py ``send_packed_command`` calls counted in each worker).

Usage::

    .venv/bin/python benchmarks/bench_locks.py
    .venv/bin/python benchmarks/bench_locks.py --iterations 3000 --rounds 100 --seconds 4
    .venv/bin/python benchmarks/bench_locks.py --quick   # section 1 and its target only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.connection

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import commandstats, load_note, table

import rcache
from rcache.testing import RedisServer

IMPLS = [
    "rcache (with: renewal on)",
    "rcache (acquire/release)",
    "rcache (fair=True)",
    "redis-py Lock (sleep=0.1)",
    "redis-py Lock (sleep=0.001)",
    "python-redis-lock",
    "pottery Redlock",
]
TTL = 10
#: iterations per subject per round of section 1 (see uncontended)
_SLICE = 50
#: Server-side floors, run with redis-py's plain client (no lock library's Python): what
#: the scripts cost the server here, beside the target's two GETs.
FLOORS = [
    "raw 2x EVALSHA (return 1)",
    "raw SET NX PX + EVALSHA release (redis-py Lock's commands)",
    "raw EVALSHA lock_acquire + lock_release (rcache's scripts)",
]
#: redis-py Lock's release script (redis/lock.py LUA_RELEASE_SCRIPT, same calls)
_RELEASE_LUA = """
local token = redis.call('get', KEYS[1])
if not token or token ~= ARGV[1] then
    return 0
end
redis.call('del', KEYS[1])
return 1
"""
#: issue 13: uncontended acquire + release <= 1.10x two GETs
TARGET_IMPL, TARGET_RATIO = "rcache (acquire/release)", 1.10

_round_trips = 0


def _count_round_trips() -> None:
    """Count client writes (one per command or pipeline) in this process."""
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        global _round_trips
        _round_trips += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]


def make(impl: str, url: str, name: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(acquire, release) of one lock object of ``impl`` for ``name`` (blocking)."""
    if impl.startswith("rcache"):
        cache = rcache.Cache(url, prefix="bench")
        lock = cache.lock(name, ttl=TTL, fair="fair" in impl)
        if "with" in impl:
            return lock.__enter__, lambda: lock.__exit__(None, None, None)
        return lock.acquire, lock.release
    client = redis.Redis.from_url(url)
    if impl.startswith("redis-py"):
        sleep = 0.1 if "0.1" in impl else 0.001
        rlock = client.lock(name, timeout=TTL, sleep=sleep)
        return rlock.acquire, rlock.release
    if impl == "python-redis-lock":
        import redis_lock

        plock = redis_lock.Lock(client, name, expire=TTL)
        return plock.acquire, plock.release
    if impl == "pottery Redlock":
        import logging

        from pottery import Redlock

        logging.getLogger("pottery").setLevel(logging.ERROR)
        pl = Redlock(key=name, masters={client}, auto_release_time=TTL)
        return pl.acquire, pl.release
    raise ValueError(impl)


# -- 1. uncontended ---------------------------------------------------------------------


def floors(
    client: redis.Redis,
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(acquire, release) of each of FLOORS: EVALSHA straight from redis-py."""
    from rcache._lock import _GRACE_MS, _LOCK_ACQUIRE, _LOCK_RELEASE, _SIGNAL_MS, Try

    one = client.script_load("return 1")
    release = client.script_load(_RELEASE_LUA)
    acquire_sha = client.script_load(_LOCK_ACQUIRE.lua.source)
    release_sha = client.script_load(_LOCK_RELEASE.lua.source)
    # the keys and arguments rcache's Lock sends for an uncontended acquire/release
    base = "bench:floor:l:{x}"
    keys = [base, f"{base}:fence", f"{base}:w", f"{base}:h"]
    signal = f"{base}:signal"
    ms = TTL * 1000
    return {
        FLOORS[0]: (lambda: client.evalsha(one, 0), lambda: client.evalsha(one, 0)),
        FLOORS[1]: (
            lambda: client.set("bench:floor:r", "t", nx=True, px=ms),
            lambda: client.evalsha(release, 1, "bench:floor:r", "t"),
        ),
        FLOORS[2]: (
            # the last argument, the waiters marker's lifetime, is read only when busy
            lambda: client.evalsha(acquire_sha, 4, *keys, "t", ms, Try.FIRST, 31000),
            lambda: client.evalsha(
                release_sha, 4, base, signal, keys[2], keys[3], "t", _SIGNAL_MS, 1,
                _GRACE_MS,
            ),
        ),
    }  # fmt: skip


def uncontended(url: str, iterations: int, reps: int) -> dict[str, float]:
    """Median seconds per acquire+release (and per two GETs, key 'raw 2x GET')."""
    samples: dict[str, list[float]] = {
        impl: [] for impl in [*IMPLS, *FLOORS, "raw 2x GET"]
    }
    client = redis.Redis.from_url(url)
    client.set("bench:raw", b"x")
    ops: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        impl: make(impl, url, f"u:{i}") for i, impl in enumerate(IMPLS)
    }
    ops.update(floors(redis.Redis.from_url(url)))
    ops["raw 2x GET"] = (
        lambda: client.get("bench:raw"),
        lambda: client.get("bench:raw"),
    )
    for acquire, release in ops.values():
        for _ in range(50):  # warm up: connections, script cache
            acquire()
            release()
    # Interleaved in slices of _SLICE iterations, every subject once per round in a
    # rotating order: the machine's load (2 shared CPUs) moves within seconds, and a
    # subject timed in one block of a rep took whatever load that moment had.
    names = list(ops)
    for rep in range(reps):
        times: dict[str, list[float]] = {impl: [] for impl in names}
        for round_ in range(max(1, iterations // _SLICE)):
            shift = (rep + round_) % len(names)
            order = names[shift:] + names[:shift]
            if round_ % 2:
                order.reverse()
            for impl in order:
                acquire, release = ops[impl]
                out = times[impl]
                for _ in range(_SLICE):
                    t0 = time.perf_counter()
                    acquire()
                    release()
                    out.append(time.perf_counter() - t0)
        for impl in names:
            samples[impl].append(statistics.median(times[impl]))
    return {impl: statistics.median(v) for impl, v in samples.items()}


# -- 2. hand-off --------------------------------------------------------------------------


def _handoff_holder(impl: str, url: str, rounds: int, conn: Any) -> None:
    acquire, release = make(impl, url, "handoff")
    for _ in range(rounds):
        acquire()
        conn.send("held")
        conn.recv()  # the waiter is about to block
        time.sleep(0.02)  # let it block (poll, BLPOP, ...)
        t0 = time.monotonic()
        release()
        conn.send(t0)
        conn.recv()


def _handoff_waiter(impl: str, url: str, rounds: int, conn: Any, out: Any) -> None:
    acquire, release = make(impl, url, "handoff")
    latencies = []
    for _ in range(rounds):
        conn.recv()
        conn.send("waiting")
        acquire()
        t1 = time.monotonic()
        t0 = conn.recv()
        release()
        latencies.append(t1 - t0)
        conn.send("done")
    out.put(latencies)


def handoff(url: str, impl: str, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    holder = ctx.Process(target=_handoff_holder, args=(impl, url, rounds, a))
    waiter = ctx.Process(target=_handoff_waiter, args=(impl, url, rounds, b, out))
    holder.start()
    waiter.start()
    latencies: list[float] = out.get(timeout=600)
    holder.join()
    waiter.join()
    return latencies


# -- 3./4. spread and load ------------------------------------------------------------


def _spread_worker(
    impl: str, url: str, seconds: float, hold: float, ready: Any, go: Any, out: Any
) -> None:
    _count_round_trips()
    acquire, release = make(impl, url, "spread")
    acquire()
    release()
    ready.put(os.getpid())
    go.wait()
    start_trips = _round_trips
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        acquire()
        if hold:
            time.sleep(hold)
        release()
        count += 1
    out.put((count, _round_trips - start_trips))


def spread(
    url: str, impl: str, procs: int, seconds: float, hold: float
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(
            target=_spread_worker, args=(impl, url, seconds, hold, ready, go, out)
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    client = redis.Redis.from_url(url)
    before = commandstats(client)
    go.set()
    results = [out.get(timeout=seconds + 120) for _ in workers]
    after = commandstats(client)
    for w in workers:
        w.join()
    counts = [c for c, _ in results]
    total = sum(counts)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    commands = sum(delta.values())
    top = sorted(delta.items(), key=lambda kv: -kv[1])[:4]
    return {
        "total": total,
        "min": min(counts),
        "max": max(counts),
        "commands": commands / max(total, 1),
        "trips": sum(t for _, t in results) / max(total, 1),
        "top": ", ".join(f"{k} {v / max(total, 1):.1f}" for k, v in top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=6)
    parser.add_argument("--hold", type=float, default=0.005)
    parser.add_argument(
        "--only", default="", help="comma-separated implementation prefixes"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only section 1 (uncontended) and its target: 1000 iterations x 5 reps",
    )
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.reps = 1000, 5
    global IMPLS
    if args.only:
        IMPLS = [i for i in IMPLS if any(i.startswith(p) for p in args.only.split(","))]

    import importlib.metadata as md

    versions = ", ".join(
        f"{d} {md.version(d)}" for d in ("redis", "python-redis-lock", "pottery")
    )
    with RedisServer() as server:
        info = server.client().info("server")
        print(
            f"redis-server {info['redis_version']} on loopback; Python "
            f"{sys.version.split()[0]}; {versions}; {os.cpu_count()} CPUs\n"
        )
        print(f"Start: {load_note()}\n")
        lat = uncontended(server.url, args.iterations, args.reps)
        raw = lat["raw 2x GET"]
        rows = [
            [impl, f"{lat[impl] * 1e6:.0f}", f"{lat[impl] / raw:.2f}"]
            for impl in [*IMPLS, *FLOORS, "raw 2x GET"]
        ]
        print(
            f"1. Uncontended acquire + release (median of {args.reps} medians of "
            f"{args.iterations})"
        )
        print(table(rows, ["implementation", "median µs", "ratio to 2 GETs"]))
        print()
        if TARGET_IMPL in lat:
            ratio = lat[TARGET_IMPL] / raw
            peers = ", ".join(
                f"{impl} {lat[impl] / raw:.2f}x"
                for impl in [*IMPLS, *FLOORS]
                if not impl.startswith("rcache")
            )
            print(f"Issue 13 target (this run; {load_note()})")
            print(
                table(
                    [
                        [
                            "uncontended acquire + release",
                            f"{lat[TARGET_IMPL] * 1e6:.0f} µs",
                            f"{raw * 1e6:.0f} µs",
                            f"{ratio:.2f}x",
                            f"<= {TARGET_RATIO:.2f}x",
                            "PASS" if ratio <= TARGET_RATIO else "FAIL",
                            peers,
                        ]
                    ],
                    [
                        "target",
                        "rcache",
                        "2 GETs",
                        "ratio",
                        "limit",
                        "",
                        "peers (same run)",
                    ],
                )
            )
            print()
        if args.quick:
            return

        rows = []
        for impl in IMPLS:
            server.client().flushall()
            values = sorted(handoff(server.url, impl, args.rounds))
            p50 = statistics.median(values) * 1000
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
            rows.append([impl, f"{p50:.2f}", f"{p99:.2f}", f"{values[-1] * 1000:.2f}"])
        print(f"2. Hand-off latency, one blocked waiter ({args.rounds} rounds, ms)")
        print(table(rows, ["implementation", "p50", "p99", "max"]))
        print()

        rows = []
        for impl in IMPLS:
            server.client().flushall()
            r = spread(server.url, impl, args.procs, args.seconds, args.hold)
            rows.append(
                [
                    impl,
                    str(r["total"]),
                    f"{r['min']}-{r['max']}",
                    f"{r['max'] / max(r['min'], 1):.2f}",
                    f"{r['commands']:.1f}",
                    f"{r['trips']:.1f}",
                    r["top"],
                ]
            )
        print(
            f"3/4. {args.procs} processes, hold {args.hold * 1000:g} ms, "
            f"{args.seconds:g} s: acquisitions, spread, Redis load per acquisition"
        )
        print(
            table(
                rows,
                [
                    "implementation",
                    "total",
                    "min-max",
                    "max/min",
                    "server cmds",
                    "round trips",
                    "top commands",
                ],
            )
        )


if __name__ == "__main__":
    main()
