"""The shop's Celery app: a locked report task, a deduplicated sync task, warming.

celery -A examples.shop.tasks worker --pool=solo --loglevel=info
celery -A examples.shop.tasks beat
"""

from __future__ import annotations

import time

from celery import Celery

import rcache_celery

from . import settings
from .store import cache, db, top_products

app = Celery("shop", broker=settings.REDIS_URL, backend=settings.REDIS_URL)
app.conf.update(task_track_started=True, broker_connection_retry_on_startup=True)
rcache_celery.install(app, cache)


@app.task(
    base=rcache_celery.LockedTask,
    lock_key="report:{day}",
    lock_ttl=60,
    on_locked="retry",
)
def build_report(day: str) -> str:
    """Never two at once, across all workers: the lock is held for the whole run."""
    db.rpush("shop:report-runs", f"start {time.time():.6f}")
    time.sleep(settings.REPORT_SECONDS)
    db.rpush("shop:report-runs", f"end {time.time():.6f}")
    return f"report for {day}"


@app.task(base=rcache_celery.UniqueTask, unique_on=["user_id"], unique_ttl=600)
def sync_user(user_id: int) -> int:
    """Clicking "sync" five times queues it once."""
    db.incr(f"shop:synced:{user_id}")
    time.sleep(0.2)
    return user_id


# beat refreshes the popular pages before they expire
rcache_celery.warm(
    app, top_products, every=settings.WARM_EVERY, args=[("books",), ("games",)]
)
