"""rcache-celery: deduplicated tasks, locked tasks and cache warming for Celery.

::

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    cache = rcache.Cache("redis://127.0.0.1:6379/1")
    rcache_celery.install(app, cache)

    @app.task(base=rcache_celery.UniqueTask, unique_on=["user_id"], unique_ttl=600)
    def sync_user(user_id): ...

    @app.task(base=rcache_celery.LockedTask, lock_key="report:{day}", lock_ttl=60)
    def build_report(day): ...

    rcache_celery.warm(app, top_products, every=240, args=[("books",), ("games",)])

Importing this package connects nothing: ``install`` connects the worker hooks, clients
are created lazily in the process that uses them.
"""

from __future__ import annotations

from rcache_celery._admin import TaskGuard, atask_guards, task_guards
from rcache_celery._exceptions import DuplicateTaskError, TaskLockedError
from rcache_celery._install import install, uninstall
from rcache_celery._serve import serve_metrics
from rcache_celery._tasks import LockedTask, UniqueTask
from rcache_celery._version import __version__
from rcache_celery._warm import warm

__all__ = [
    "DuplicateTaskError",
    "LockedTask",
    "TaskGuard",
    "TaskLockedError",
    "UniqueTask",
    "__version__",
    "atask_guards",
    "install",
    "serve_metrics",
    "task_guards",
    "uninstall",
    "warm",
]
