"""rcache-celery: a deduplicated task and a locked task, run by a real (in-process) worker.

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/celery_tasks.py

The shop example (examples/shop) shows the same with separate worker and beat processes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import redis
from _redis import redis_url
from celery import Celery
from celery.contrib.testing.worker import start_worker

import rcache
import rcache_celery


def main(url: str) -> None:
    app = Celery("example", broker=url, backend=url)
    app.conf.broker_connection_retry_on_startup = True
    cache = rcache.Cache(url, prefix="example")
    rcache_celery.install(app, cache)
    db = redis.Redis.from_url(url)

    @app.task(base=rcache_celery.UniqueTask, unique_on=["user_id"], unique_ttl=600)
    def sync_user(user_id: int) -> int:
        db.incr(f"example:synced:{user_id}")
        time.sleep(0.2)
        return user_id

    @app.task(
        base=rcache_celery.LockedTask,
        lock_key="report:{day}",
        lock_ttl=30,
        on_locked="skip",
    )
    def build_report(day: str) -> str:
        time.sleep(0.5)
        return f"report {day}"

    # enqueue before the worker starts: the duplicates find the first task queued
    ids = {sync_user.delay(7).id for _ in range(5)}
    print(f"sync_user.delay(7) five times -> {len(ids)} task id(s)")
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        sync_user.AsyncResult(ids.pop()).get(timeout=30)
        print("the task ran", int(db.get("example:synced:7") or 0), "time(s)")
        first = build_report.delay("2024-11-01")
        print("build_report ->", first.get(timeout=30))
    keys = [k.decode() for k in db.scan_iter("example:celery:[ul]:*")]
    markers = [k for k in keys if ":r:" in k]  # "this run happened", for redeliveries
    print("dedup/lock guards held after the tasks finished:", len(keys) - len(markers))
    print(f"run markers (expire after the redelivery window): {len(markers)}")


if __name__ == "__main__":
    with redis_url(memory_ok=False) as url:
        main(url)
    print("celery_tasks example finished")
