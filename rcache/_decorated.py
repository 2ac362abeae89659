"""The objects returned by ``@cache.cached``: one sync and one async wrapper.

Both share ``CachedSpec`` (everything decided at decoration time) and differ only in
awaiting. They implement ``__get__`` so decorated methods bind like functions.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from rcache._cache import _MISSING, BYPASS, Cache
from rcache._config import BackendErrorPolicy
from rcache._exceptions import SerializationError
from rcache._keys import KeyBuilder
from rcache._serializers import encode_envelope

__all__ = ["AsyncCached", "CachedSpec", "SyncCached"]

_UNBOUND: Any = object()


@dataclass(frozen=True)
class CachedSpec:
    cache: Cache
    fn: Callable[..., Any]
    keys: KeyBuilder
    name: str
    ttl: float
    policy: BackendErrorPolicy
    cache_none: bool
    unless: Callable[[Any], bool] | None
    on_unserializable: Literal["raise", "skip"]

    def encode(self, value: Any, compute_time: float) -> bytes | None:
        """Envelope bytes to store, or None when this result is not to be cached."""
        if value is None and not self.cache_none:
            return None
        if self.unless is not None and self.unless(value):
            return None
        try:
            return encode_envelope(
                self.cache.serializer,
                value,
                compute_time=compute_time,
                fresh_for=self.ttl,
            )
        except SerializationError as exc:
            if self.on_unserializable == "skip":
                self.cache.metrics.cache_error(
                    self.name, "serialize", "SerializationError"
                )
                return None
            raise SerializationError(
                f"{self.name} returned a {type(value).__qualname__} that the "
                f"{self.cache.serializer.name} serializer cannot store ({exc}); return "
                "plain data, choose another serializer, or pass on_unserializable='skip'"
            ) from None


class _Base:
    __slots__ = ("__dict__", "_bound", "_spec")

    def __init__(self, spec: CachedSpec, bound: Any = _UNBOUND) -> None:
        self._spec = spec
        self._bound = bound
        functools.update_wrapper(self, spec.fn)  # type: ignore[arg-type]

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None or self._bound is not _UNBOUND:
            return self
        return type(self)(self._spec, instance)

    def __repr__(self) -> str:
        return f"<cached {self._spec.name} ttl={self._spec.ttl:g}s>"

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return args if self._bound is _UNBOUND else (self._bound, *args)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """The full Redis key for these arguments."""
        return self._spec.keys.build(self._args(args), kwargs)


class SyncCached(_Base):
    """A sync function decorated with ``@cache.cached``."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._args(args)
        spec = self._spec
        key = spec.keys.build(args, kwargs)
        cache = spec.cache
        raw = cache._get_raw(key, spec.name, spec.policy)
        if raw is not None and raw is not BYPASS:
            value = cache._decode(spec.name, raw)
            if value is not _MISSING:
                cache.metrics.cache_get(spec.name, "hit")
                return value
        cache.metrics.cache_get(spec.name, "miss")
        return self._load(key, args, kwargs, store=raw is not BYPASS)

    def _load(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], store: bool
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        start = time.perf_counter()
        try:
            value = spec.fn(*args, **kwargs)
        except BaseException:
            cache.metrics.cache_load(spec.name, "failure", time.perf_counter() - start)
            raise
        elapsed = time.perf_counter() - start
        cache.metrics.cache_load(spec.name, "success", elapsed)
        if store:
            data = spec.encode(value, elapsed)
            if data is not None:
                cache._set_raw(key, data, spec.ttl, spec.name, spec.policy)
        return value

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        args = self._args(args)
        return self._load(self._spec.keys.build(args, kwargs), args, kwargs, store=True)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there."""
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        return spec.cache._delete_raw(key, spec.name, spec.policy)


class AsyncCached(_Base):
    """An ``async def`` function decorated with ``@cache.cached``."""

    __slots__ = ()

    def __init__(self, spec: CachedSpec, bound: Any = _UNBOUND) -> None:
        super().__init__(spec, bound)
        # Let inspect.iscoroutinefunction() see a coroutine function, as frameworks
        # (FastAPI, Celery, pytest) dispatch on it: 3.12+ has a marker; before that,
        # inspect treats an object with __code__/__defaults__ as function-like.
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(self)
        elif bound is _UNBOUND and hasattr(spec.fn, "__code__"):
            self.__code__ = spec.fn.__code__
            self.__defaults__ = getattr(spec.fn, "__defaults__", None)
            self.__kwdefaults__ = getattr(spec.fn, "__kwdefaults__", None)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._args(args)
        spec = self._spec
        key = spec.keys.build(args, kwargs)
        cache = spec.cache
        raw = await cache._aget_raw(key, spec.name, spec.policy)
        if raw is not None and raw is not BYPASS:
            value = cache._decode(spec.name, raw)
            if value is not _MISSING:
                cache.metrics.cache_get(spec.name, "hit")
                return value
        cache.metrics.cache_get(spec.name, "miss")
        return await self._load(key, args, kwargs, store=raw is not BYPASS)

    async def _load(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], store: bool
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        start = time.perf_counter()
        try:
            value = await spec.fn(*args, **kwargs)
        except BaseException:
            cache.metrics.cache_load(spec.name, "failure", time.perf_counter() - start)
            raise
        elapsed = time.perf_counter() - start
        cache.metrics.cache_load(spec.name, "success", elapsed)
        if store:
            data = spec.encode(value, elapsed)
            if data is not None:
                await cache._aset_raw(key, data, spec.ttl, spec.name, spec.policy)
        return value

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        args = self._args(args)
        return await self._load(
            self._spec.keys.build(args, kwargs), args, kwargs, store=True
        )

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there."""
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        return await spec.cache._adelete_raw(key, spec.name, spec.policy)
