"""Distributed locks (issue 4). Placeholder mixin: filled in by the locks work."""

from __future__ import annotations

from rcache._mixin import CacheBase

__all__ = ["LockMixin"]


class LockMixin(CacheBase):
    """Adds ``lock``, ``locked``, ``rwlock`` and ``semaphore`` to ``Cache``."""
