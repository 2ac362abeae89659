"""gunicorn settings for the shop with multiprocess-correct /metrics.

export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)   # before Python starts
gunicorn -c examples/shop/gunicorn.conf.py examples.shop.app:app
"""

from __future__ import annotations

from typing import Any

bind = "127.0.0.1:8000"
workers = 2


def child_exit(server: Any, worker: Any) -> None:
    # drop the dead worker's live gauges (rcache_locks_held is a livesum gauge)
    from rcache.metrics import mark_process_dead

    mark_process_dead(worker.pid)
