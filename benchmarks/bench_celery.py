"""rcache-celery's UniqueTask beside plain delay(), celery-once and celery-singleton.

Not a test. Starts its own redis-server (rcache.testing.RedisServer) on a free port,
used as broker (db 0), result backend (db 1) and lock store (db 2); no worker runs, the
messages just sit in the queue. For each implementation it measures, per call:

1. ``delay()`` of a task with new arguments (lock + publish), median and p99 latency,
   and its ratio to a plain ``delay()`` (publish only);
2. ``delay()`` of a duplicate (the arguments are already queued): what a caller pays to
   be told "already queued", and whether it gets the existing task's id;
3. Redis commands per duplicate call, counted by the server (INFO commandstats).

Usage::

    .venv/bin/python benchmarks/bench_celery.py
    .venv/bin/python benchmarks/bench_celery.py --iterations 3000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import client_commands, commandstats, table
from celery import Celery

import rcache
import rcache_celery
from rcache.testing import RedisServer


def build(url: str) -> dict[str, Any]:
    from celery_once import QueueOnce
    from celery_singleton import Singleton

    app = Celery("bench", broker=f"{url}/0", backend=f"{url}/1")
    app.conf.update(
        broker_connection_retry_on_startup=True,
        ONCE={
            "backend": "celery_once.backends.Redis",
            "settings": {"url": f"{url}/2", "default_timeout": 3600},
        },
        singleton_backend_url=f"{url}/2",
    )
    rcache_celery.install(app, rcache.Cache(f"{url}/2", prefix="bench"))

    @app.task(name="b.plain", shared=False)
    def plain(x: str) -> str:
        return x

    @app.task(base=rcache_celery.UniqueTask, name="b.rcache", shared=False)
    def unique(x: str) -> str:
        return x

    @app.task(base=QueueOnce, name="b.once", once={"graceful": True}, shared=False)
    def once(x: str) -> str:
        return x

    @app.task(base=Singleton, name="b.singleton", shared=False)
    def singleton(x: str) -> str:
        return x

    return {
        "app": app,
        "plain": plain,
        "rcache": unique,
        "once": once,
        "singleton": singleton,
    }


def timed(fn: Callable[[int], Any], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    n = opts.iterations
    with RedisServer() as server:
        url = f"redis://127.0.0.1:{server.port}"
        tasks = build(url)
        admin = server.client()
        names = ["plain", "rcache", "once", "singleton"]
        first: dict[str, list[float]] = {k: [] for k in names}
        dup: dict[str, list[float]] = {k: [] for k in names}
        dup_cmds: dict[str, float] = {}
        same_id: dict[str, str] = {}
        for task in names:  # warm the connections
            tasks[task].delay("warm-up")
        for _ in range(opts.rounds):
            for name in names:  # interleaved, so that machine noise hits all alike
                task = tasks[name]
                run = uuid.uuid4().hex[:8]
                first[name] += timed(lambda i, t=task, r=run: t.delay(f"{r}-{i}"), n)
                if name == "plain":
                    continue
                held = task.delay(f"{run}-dup")
                before = commandstats(admin)
                times = timed(lambda i, t=task, r=run: t.delay(f"{r}-dup"), n)
                after = commandstats(admin)
                dup[name] += times
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                dup_cmds[name] = client_commands(delta) / n
                again = task.delay(f"{run}-dup")
                got = getattr(again, "id", None)
                same_id[name] = (
                    "yes" if got == held.id else f"no ({type(again).__name__} id={got})"
                )
                admin.flushdb()  # db 0: drop the queued messages between rounds
        base = statistics.median(first["plain"])
        rows = []
        for name in names:
            f_med = statistics.median(first[name])
            row = [
                name,
                f"{f_med:.0f}",
                f"{p99(first[name]):.0f}",
                f"{f_med / base:.2f}x",
            ]
            if name == "plain":
                row += ["-", "-", "-", "-"]
            else:
                d_med = statistics.median(dup[name])
                row += [
                    f"{d_med:.0f}",
                    f"{p99(dup[name]):.0f}",
                    f"{dup_cmds[name]:.1f}",
                    same_id[name],
                ]
            rows.append(row)
        print(
            f"delay() latency in microseconds, {opts.rounds} rounds x {n} calls each, "
            "one redis-server on loopback"
        )
        print(
            table(
                rows,
                [
                    "implementation",
                    "new: median",
                    "new: p99",
                    "new vs plain",
                    "duplicate: median",
                    "duplicate: p99",
                    "Redis cmds/duplicate",
                    "duplicate gets existing id",
                ],
            )
        )


if __name__ == "__main__":
    main()
