"""Celery integration for rcache (skeleton: see issue 7)."""

from __future__ import annotations

from rcache_celery._version import __version__

__all__ = ["__version__"]
