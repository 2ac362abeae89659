"""Contended throughput of ``cache.transaction`` vs a hand-written redis-py WATCH loop.

Not a test. Starts its own redis-server (rcache.testing.RedisServer) on a free port,
then, for each process count, runs the same decrement-a-stock-counter transaction
through both implementations in the same worker processes, alternating which goes
first, several repetitions each, and prints the medians and rcache's overhead::

    .venv/bin/python benchmarks/bench_transactions.py
    .venv/bin/python benchmarks/bench_transactions.py --processes 1,2,4,8 --ops 2000 --reps 7

Throughput is transactions committed per second over the wall time from a barrier
release until the last worker finished. The hand-written loop is the redis-py idiom
(``pipe.watch``; read; ``pipe.multi()``; write; ``pipe.execute()``; on WatchError try
again at once). rcache adds jittered exponential backoff between conflicting attempts,
error mapping and the safety checks (no retry after EXEC was sent).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import redis

import rcache
from rcache._transaction import TransactionStats
from rcache.testing import RedisServer

KEY = "bench:stock"


def _rcache_loop(cache: rcache.Cache, ops: int) -> int:
    stats = TransactionStats()

    def take_one(pipe: Any) -> None:
        stock = int(pipe.get(KEY))
        pipe.multi()
        pipe.set(KEY, stock - 1)

    for _ in range(ops):
        cache.transaction(
            take_one, watch=[KEY], retries=10_000, max_time=60, stats=stats
        )
    return stats.conflicts


def _redis_py_loop(client: redis.Redis, ops: int) -> int:
    conflicts = 0
    for _ in range(ops):
        with client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(KEY)  # type: ignore[no-untyped-call]
                    stock = int(pipe.get(KEY))  # type: ignore[arg-type]
                    pipe.multi()
                    pipe.set(KEY, stock - 1)
                    pipe.execute()
                    break
                except redis.WatchError:
                    conflicts += 1
    return conflicts


def _worker(url: str, conn: Connection, barrier: Barrier) -> None:
    cache = rcache.Cache(url, prefix="bench")
    client = redis.Redis.from_url(url)
    # The same loop over rcache's own client (its timeouts, no redis-py retries): the
    # difference to "rcache" is then the transaction helper alone.
    same_client = cache._sync.client
    # Warm up both (a key per worker, so that warming up never conflicts).
    warm = f"{KEY}:warm:{os.getpid()}"
    client.set(warm, 1)
    for _ in range(50):
        cache.transaction(lambda p: None, watch=[warm])
        with client.pipeline() as pipe:
            pipe.watch(warm)  # type: ignore[no-untyped-call]
            pipe.multi()
            pipe.execute()
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        impl, ops = msg
        barrier.wait()
        if impl == "rcache":
            conflicts = _rcache_loop(cache, ops)
        elif impl == "redis-py":
            conflicts = _redis_py_loop(client, ops)
        else:
            conflicts = _redis_py_loop(same_client, ops)
        conn.send(conflicts)
    cache.close()
    client.close()


def _measure(
    conns: list[Connection], barrier: Barrier, admin: redis.Redis, impl: str, ops: int
) -> tuple[float, int]:
    per_worker = ops // len(conns)
    start_value = 10**9
    admin.set(KEY, start_value)
    for c in conns:
        c.send((impl, per_worker))
    barrier.wait()
    start = time.perf_counter()
    conflicts = sum(c.recv() for c in conns)
    elapsed = time.perf_counter() - start
    done = per_worker * len(conns)
    final = int(admin.get(KEY))  # type: ignore[arg-type]
    assert final == start_value - done, f"{impl}: lost or doubled updates: {final}"
    return done / elapsed, conflicts


IMPLS = ["redis-py", "redis-py/same-client", "rcache"]


def run(processes: list[int], ops: int, reps: int) -> None:
    ctx = mp.get_context("spawn")
    print(
        f"python {sys.version.split()[0]}, redis-py {redis.__version__}, "
        f"rcache {rcache.__version__}; {ops} transactions per run, {reps} runs per "
        "implementation, interleaved (order rotated every run); medians"
    )
    print(
        f"{'procs':>5}  {'redis-py tx/s':>13}  {'same-client tx/s':>16}  "
        f"{'rcache tx/s':>11}  {'overhead':>8}  {'vs same-client':>14}  "
        f"{'conflicts/tx redis-py':>21}  {'rcache':>6}"
    )
    with RedisServer() as server:
        admin = server.client()
        for n in processes:
            barrier = ctx.Barrier(n + 1)
            pipes = [ctx.Pipe() for _ in range(n)]
            workers = [
                ctx.Process(
                    target=_worker, args=(server.url, child, barrier), daemon=True
                )
                for _, child in pipes
            ]
            for w in workers:
                w.start()
            conns = [parent for parent, _ in pipes]
            for c in conns:
                assert c.recv() == "ready"
            results: dict[str, list[tuple[float, int]]] = {i: [] for i in IMPLS}
            for rep in range(reps):
                # Short runs, interleaved and rotated: the machine's background load
                # (other processes, CPU frequency) hits every implementation alike.
                for impl in IMPLS[rep % 3 :] + IMPLS[: rep % 3]:
                    results[impl].append(_measure(conns, barrier, admin, impl, ops))
            for c in conns:
                c.send(None)
            for w in workers:
                w.join(timeout=30)
            tput = {i: statistics.median(t for t, _ in results[i]) for i in IMPLS}
            done = (ops // n) * n
            conf = {
                i: statistics.median(c for _, c in results[i]) / done for i in IMPLS
            }
            overhead = (tput["redis-py"] / tput["rcache"] - 1) * 100
            same = (tput["redis-py/same-client"] / tput["rcache"] - 1) * 100
            print(
                f"{n:>5}  {tput['redis-py']:>13.0f}  {tput['redis-py/same-client']:>16.0f}  "
                f"{tput['rcache']:>11.0f}  {overhead:>7.1f}%  {same:>13.1f}%  "
                f"{conf['redis-py']:>21.2f}  {conf['rcache']:>6.2f}"
            )
        admin.close()
    print(
        "overhead = redis-py throughput / rcache throughput - 1 (target <= 10%; "
        "negative: rcache is faster)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated counts")
    parser.add_argument("--ops", type=int, default=600, help="transactions per run")
    parser.add_argument("--reps", type=int, default=15, help="runs per implementation")
    args = parser.parse_args()
    run([int(p) for p in args.processes.split(",")], args.ops, args.reps)


if __name__ == "__main__":
    main()
