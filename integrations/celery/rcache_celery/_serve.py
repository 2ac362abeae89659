"""``serve_metrics``: one Prometheus exporter per worker, in its main process.

Under prefork the pool children count dedup, lock and warming events and the main
process counts recoveries; with ``PROMETHEUS_MULTIPROC_DIR`` set in the start-up shell
they all write to that directory, and the one exporter started here serves the sum.
An exporter per child would report 1/N of the counts (PostHog PR #56109) and only one
child could bind the port.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import signals  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["serve_metrics"]

log = logging.getLogger("rcache.celery")
_ATTR = "_rcache_celery_exporter"


def serve_metrics(app: Celery, *, port: int, addr: str = "127.0.0.1") -> None:
    """Start a ``/metrics`` server in the worker's main process when it is ready.

    :param app: the Celery app; only workers of this app start the server.
    :param port: TCP port (0 picks a free one; the bound port is logged).
    :param addr: address to bind; loopback by default.

    Needs ``rcache-redis[prometheus]``. Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
    directory before the worker starts (``export PROMETHEUS_MULTIPROC_DIR=...; celery
    -A proj worker``), and empty it at each start-up: per-pid files pile up with
    ``worker_max_tasks_per_child``. Idempotent; the server stops with the worker.
    """
    uid = f"rcache_celery_metrics:{id(app)}"

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app or getattr(app, _ATTR, None):
            return
        from rcache.metrics import start_http_server

        server = start_http_server(port, addr)
        setattr(app, _ATTR, server)
        log.info("rcache-celery: serving metrics on %s:%s", addr, server.port)

    def on_shutdown(**_: Any) -> None:
        server = getattr(app, _ATTR, None)
        if server is not None:
            server.close()
            setattr(app, _ATTR, None)

    signals.worker_ready.connect(on_ready, weak=False, dispatch_uid=uid + ":ready")
    signals.worker_shutdown.connect(on_shutdown, weak=False, dispatch_uid=uid + ":down")
