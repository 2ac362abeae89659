"""Transaction helpers (issue 5). Placeholder mixin: filled in by the transactions work."""

from __future__ import annotations

from rcache._mixin import CacheBase

__all__ = ["TransactionMixin"]


class TransactionMixin(CacheBase):
    """Adds ``transaction``, ``update`` and ``script`` (and a-twins) to ``Cache``."""
