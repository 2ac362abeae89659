from __future__ import annotations

__version__ = "0.1.0.dev0"
"""The version of the ``rcache-celery`` distribution."""
