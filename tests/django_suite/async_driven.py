"""Test-only backend: Django's sync cache suite driven through the native async methods.

Django's ``BaseCacheTests`` call the sync API; this subclass answers every sync call by
running the matching ``a``-method on one event loop in a helper thread, so the whole
suite exercises ``aget``, ``aset``, ``aadd``, ``aincr``, ... on rcache's asyncio client.
(Sync-over-async is fine in a test harness; the library itself never does it.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from rcache.django import RCacheBackend

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result(timeout=30)


class AsyncDrivenBackend(RCacheBackend):
    def get(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aget(*args, **kwargs))

    def set(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aset(*args, **kwargs))

    def add(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aadd(*args, **kwargs))

    def touch(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.atouch(*args, **kwargs))

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.adelete(*args, **kwargs))

    def has_key(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.ahas_key(*args, **kwargs))

    def get_many(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aget_many(*args, **kwargs))

    def set_many(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aset_many(*args, **kwargs))

    def delete_many(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.adelete_many(*args, **kwargs))

    def incr(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aincr(*args, **kwargs))

    def decr(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.adecr(*args, **kwargs))

    def get_or_set(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aget_or_set(*args, **kwargs))

    def incr_version(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.aincr_version(*args, **kwargs))

    def decr_version(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.adecr_version(*args, **kwargs))

    def clear(self) -> Any:
        return _run(self.aclear())

    def close(self, **kwargs: Any) -> Any:
        return _run(self.aclose(**kwargs))
