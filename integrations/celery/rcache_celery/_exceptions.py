"""Exceptions of rcache-celery; all survive pickling (celery-singleton #55).

Every constructor argument is kept in ``self.args``, so a worker can send them through
the result backend and a client can unpickle them.
"""

from __future__ import annotations

from rcache import LockNotAcquiredError, RCacheError

__all__ = ["DuplicateTaskError", "TaskLockedError"]


class DuplicateTaskError(RCacheError):
    """``apply_async`` of a unique task whose twin is queued or running.

    Raised only with ``on_duplicate="raise"``; ``.task_id`` is the existing task's id.
    """

    def __init__(self, task_name: str, task_id: str) -> None:
        super().__init__(task_name, task_id)
        self.task_name = task_name
        self.task_id = task_id

    def __str__(self) -> str:
        return f"{self.task_name} is already queued or running as task {self.task_id}"


class TaskLockedError(LockNotAcquiredError):
    """A locked task found its lock held (``on_locked="fail"``, or ``"wait"`` timed out).

    Exactly two constructor arguments: ``LockNotAcquiredError`` is a ``TimeoutError``,
    i.e. an ``OSError``, whose ``args`` keep only the first two of three or more
    (errno, strerror), so Celery could not rebuild a three-argument error from the
    result backend.
    """

    def __init__(self, lock: str, holder: str) -> None:
        super().__init__(lock, holder)
        self.lock = lock
        self.holder = holder

    def __str__(self) -> str:
        return f"lock {self.lock!r} is held by task {self.holder}"
