"""Type-level contracts of the Django backend, checked by ``mypy --strict`` (not run)."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import rcache
from rcache.django import RCacheBackend

backend = RCacheBackend("redis://127.0.0.1:6379/0", {"TIMEOUT": 60})


def sync_use() -> None:
    assert_type(backend.rcache, rcache.Cache)
    assert_type(backend.lock("report", ttl=30, timeout=5), rcache.Lock)
    assert_type(backend.get("k"), Any)
    assert_type(backend.add("k", 1), bool)
    assert_type(backend.incr("k"), int)
    assert_type(backend.set_many({"k": 1}), list[Any])
    assert_type(backend.get_backend_timeout(None), "float | None")


async def async_use() -> None:
    assert_type(await backend.aget("k"), Any)
    assert_type(await backend.aincr("k", 2), int)
    assert_type(await backend.atouch("k"), bool)
